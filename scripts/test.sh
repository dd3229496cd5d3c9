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
# A whole run (no arguments) builds the sanitizer trees in the background
# at idle CPU and I/O priority while the other tiers run (see
# tests/sanitize/CMakeLists.txt): it takes only what they leave idle, and
# the sanitize.* entries, which run last and alone, wait on each tree's lock
# for whatever is left of its build.
bg=
if (($# == 0)) && [[ -x $build/sanitize-build.sh ]]; then
  # Its own process group (setsid), so that the kill below reaches ninja too.
  setsid nice -n 19 chrt --idle 0 ionice -c 3 "$build/sanitize-build.sh" >"$build/sanitize-build.log" 2>&1 &
  bg=$!
  # An entry that has to wait for its tree raises this build's priority.
  export SVM_SANITIZE_BUILD_PGID=$bg
fi
rc=0
ctest --output-on-failure -j "${SVM_TEST_JOBS:-2}" "$@" || rc=$?
if [[ -n $bg ]]; then
  kill -- "-$bg" 2>/dev/null || true # done unless the sanitize entries did not run
  wait "$bg" 2>/dev/null || true
fi
exit "$rc"
