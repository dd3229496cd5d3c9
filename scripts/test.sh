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
# A whole run with the VM tier downloads and unpacks its kernels, builds the
# shim for them and their initramfs (tests/vm/run-vm.sh --prepare-only), and
# the base of the systemd test's disk image (debootstrap, the kernel, dkms:
# build-image.sh --base-only) while the host build runs. It is CPU work too
# (dpkg, debootstrap, initramfs, module builds): beside it the build phase
# took 757 s in a fresh-clone run on 2026-12-02, against 480 s (the packages
# installed too) in the run before, without it. But the VM entries, one
# after another on the run's critical path, then find the cache warm; cold,
# the first entry of each kernel and vm_systemd_stable prepared it
# themselves (measured on their own: the stable kernel 30 s, the unstable
# one with its sid chroot 167 s, the systemd image 192 s). A failure here
# is only reported: each entry prepares what it needs itself and fails
# there with the reason.
warm=
if (($# == 0)) && [[ ${SVM_VM_TESTS:-ON} == ON && -x $root/tests/vm/run-vm.sh ]]; then
  mkdir -p "$build/vm-cache"
  (set -e
   for kernel in stable unstable; do
     "$root/tests/vm/run-vm.sh" --kernel "$kernel" --cache "$build/vm-cache" --prepare-only
   done
   env_file=$("$root/tests/vm/prepare-kernel.sh" --kernel stable --cache "$build/vm-cache" | tail -1)
   "$root/tests/vm/systemd/build-image.sh" --cache "$build/vm-cache" --env "$env_file" --base-only
  ) >"$build/vm-warm.log" 2>&1 &
  warm=$!
fi
"$root/scripts/build.sh" -DSVM_VM_TESTS="${SVM_VM_TESTS:-ON}"
if [[ -n $warm ]] && ! wait "$warm"; then
  echo "test.sh: warming the VM cache failed (see $build/vm-warm.log); the VM entries will say why" >&2
fi
cd "$build"
rc=0
ctest --output-on-failure -j "${SVM_TEST_JOBS:-2}" "$@" || rc=$?
exit "$rc"
