#!/usr/bin/env bash
# Configures and builds svm into ${SVM_BUILD_DIR:-build} (CMake + Ninja).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SVM_BUILD_DIR:-$root/build}
jobs=${SVM_JOBS:-2}
if [[ ! -f $build/build.ninja ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
elif (($#)); then
  cmake -S "$root" -B "$build" "$@"
fi
ninja -C "$build" -j "$jobs"
