#!/usr/bin/env bash
# Installs what svm needs, builds it and runs every test tier CTest knows:
# unit, integration, the VM tier (real kernels in QEMU: needs network access
# to Debian's archive on first run, cached under the build directory) and a
# short benchmark smoke run. Extra arguments go to ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SVM_BUILD_DIR:-$root/build}
if [[ -x $root/tests/vm/install-vm-deps.sh && ${SVM_VM_TESTS:-ON} == ON ]]; then
  "$root/tests/vm/install-vm-deps.sh"
fi
# A whole run with the VM tier downloads and unpacks its kernels, builds the
# shim for them and their initramfs (tests/vm/run-vm.sh --prepare-only), and
# the base of the systemd test's disk image (debootstrap, the kernel, dkms:
# build-image.sh --base-only) while the host's packages are installed and
# svm is built: mostly network and disk, at a lower CPU priority than the
# build, and the VM entries, one after another on the run's critical path,
# find the cache warm (a cold cache cost them about 8 minutes). It uses
# only its own apt state and chroots, never the host's package database. A
# failure here is only reported: each entry prepares what it needs itself
# and fails there with the reason.
warm=
if (($# == 0)) && [[ ${SVM_VM_TESTS:-ON} == ON && -x $root/tests/vm/run-vm.sh ]]; then
  mkdir -p "$build/vm-cache"
  (renice -n 10 -p "$BASHPID" >/dev/null
   set -e
   for kernel in stable unstable; do
     "$root/tests/vm/run-vm.sh" --kernel "$kernel" --cache "$build/vm-cache" --prepare-only
   done
   env_file=$("$root/tests/vm/prepare-kernel.sh" --kernel stable --cache "$build/vm-cache" | tail -1)
   "$root/tests/vm/systemd/build-image.sh" --cache "$build/vm-cache" --env "$env_file" --base-only
  ) >"$build/vm-warm.log" 2>&1 &
  warm=$!
fi
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DSVM_VM_TESTS="${SVM_VM_TESTS:-ON}"
if [[ -n $warm ]] && ! wait "$warm"; then
  echo "test.sh: warming the VM cache failed (see $build/vm-warm.log); the VM entries will say why" >&2
fi
cd "$build"
rc=0
ctest --output-on-failure -j "${SVM_TEST_JOBS:-2}" "$@" || rc=$?
exit "$rc"
