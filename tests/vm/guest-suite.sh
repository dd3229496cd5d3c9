#!/bin/bash
# The shim's VM suite, run inside the guest by vm-shim-suite.sh:
# behaviour tests, then the ioctl fuzz loop, then unloading the module.
bin=$1
fuzz_secs=${2:-25}
k="$SVM_VM_KERNEL $SVM_VM_KVER"
echo 32 >/proc/sys/vm/nr_hugepages
echo "== [$k] shim tests (hugepages reserved: $(cat /proc/sys/vm/nr_hugepages))"
"$bin/shim_tests"
t=$?
echo "== [$k] ioctl fuzz, ${fuzz_secs}s"
"$bin/shim_fuzz" "$fuzz_secs"
f=$?
echo "== [$k] unload"
rmmod svm_shim
u=$?
if grep -q '^svm_shim ' /proc/modules || [[ -e /dev/svm_shim ]]; then
	echo "svm_shim still present after rmmod"
	u=1
fi
echo "== [$k] rxe: $SVM_VM_RXE"
echo "== [$k] tests rc=$t fuzz rc=$f rmmod rc=$u"
((t == 0 && f == 0 && u == 0))
