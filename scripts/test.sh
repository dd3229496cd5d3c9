#!/usr/bin/env bash
# Installs what svm needs, builds it and runs every test tier CTest knows:
# unit, integration, the VM tier (real kernels in QEMU: needs network access
# to Debian's archive on first run, cached under the build directory) and a
# short benchmark smoke run. Extra arguments go to ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SVM_BUILD_DIR:-$root/build}
"$root/scripts/install-deps.sh"
if [[ -x $root/tests/vm/install-vm-deps.sh && ${SVM_VM_TESTS:-ON} == ON ]]; then
  "$root/tests/vm/install-vm-deps.sh"
fi
"$root/scripts/build.sh" -DSVM_VM_TESTS="${SVM_VM_TESTS:-ON}"
cd "$build"
exec ctest --output-on-failure -j "${SVM_TEST_JOBS:-2}" "$@"
