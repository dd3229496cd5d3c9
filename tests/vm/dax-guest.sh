#!/bin/bash
# The DAX suite, run inside the guest by vm-dax-suite.sh (the guest was
# booted with memmap=SIZE!OFFSET: an e820 pmem region, namespace0.0).
#
#   dax-guest.sh TOOLS_DIR DAX_TEST [--expect-odp]
#
# $SVM_DAX_TRANSPORTS: the transports of the svmd runs (default "tcp rdma").
#
# 1. device-dax: namespace0.0 as devdax (2 MiB alignment) -> /dev/daxN.M;
#    dax_tests (shim: order, reads, unbind), then dax_test DevDax.* through
#    svmd over tcp and over rdma (rxe0), or $SVM_DAX_TRANSPORTS.
# 2. fsdax: namespace0.0 reconfigured as fsdax -> /dev/pmemN, ext4 mounted
#    -o dax; dax_tests (shim: order, reads, truncate, punch hole), then
#    dax_test FsDax.* over tcp and rdma (truncate + unmount teardown).
# Every shim test must pass (a skip is a failure here: the mode is set up).
tools=$1
daxtest=$2
expect_odp=0
[[ ${3:-} == --expect-odp ]] && expect_odp=1
k="$SVM_VM_KERNEL $SVM_VM_KVER"
mp() { modprobe -d "$SVM_VM_MODROOT" "$@"; }
rc=0
fail() { echo "== [$k] FAIL: $*"; rc=1; }
ln -sf /proc/self/fd /dev/fd 2>/dev/null

# Waits until the command succeeds, at most 30 s (300 x 0.1 s): a loaded
# host slows the emulated guest several times over, and an early give-up
# fails the suite for the machine's speed.
wait_for() {
	for _ in $(seq 300); do
		"$@" && return 0
		sleep 0.1
	done
	return 1
}
# -C /dev/null: Debian's modprobe.d runs `ndctl load-keys` and a plain
# modprobe (without -d) before libnvdimm; there are no keys here.
for m in nd_e820 nd_pmem dax_pmem device_dax ext4; do
	mp -C /dev/null "$m" || echo "== [$k] modprobe $m failed"
done
udevadm settle >/dev/null 2>&1
has_namespace() { ndctl list -N 2>/dev/null | grep -q namespace0.0; }
wait_for has_namespace || true
echo "== [$k] pmem: $(ndctl list -N 2>&1 | tr -d ' \n')"

# Runs the shim tests named, requires "N passed, 0 failed, 0 skipped".
shim() {
	local want=$1 out
	shift
	out=$("$tools/dax_tests" "$@" 2>&1)
	echo "$out"
	grep -qx "$want passed, 0 failed, 0 skipped" <<<"$out" || fail "dax_tests $*"
}
# dax_test through svmd with the shim source, once per transport.
e2e() {
	local filter=$1 t
	for t in ${SVM_DAX_TRANSPORTS:-tcp rdma}; do
		if [[ $t == rdma && $SVM_VM_RXE != rxe0* ]]; then
			fail "no rxe0 for the rdma run: $SVM_VM_RXE"
			continue
		fi
		echo "== [$k] svmd $filter over $t"
		env SVM_TEST_SOURCE=shim SVM_TEST_SLOW=1 TMPDIR="$SVM_VM_SCRATCH" \
			SVM_TEST_TRANSPORT=$t SVM_EXPECT_ODP=$([[ $t == rdma ]] && echo $expect_odp) \
			SVM_EXPECT_RDMA=$([[ $t == rdma ]] && echo 1) \
			"$daxtest" --gtest_brief=1 --gtest_filter="$filter" >"$SVM_VM_SCRATCH/e2e.log" 2>&1
		local r=$?
		cat "$SVM_VM_SCRATCH/e2e.log"
		((r == 0)) || fail "dax_test $filter over $t"
		grep -q SKIPPED "$SVM_VM_SCRATCH/e2e.log" && fail "dax_test $filter over $t skipped"
	done
}

# ------------------------------------------------------------- device-dax
if ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M >"$SVM_VM_SCRATCH/ns.json" 2>&1; then
	dax=$(sed -n 's/.*"chardev":"\{0,1\} *"\(dax[0-9.]*\)".*/\1/p' "$SVM_VM_SCRATCH/ns.json" | head -1)
	[[ -n $dax ]] || dax=$(ls /sys/bus/dax/devices | head -1)
	echo "== [$k] device-dax /dev/$dax"
	wait_for test -c "/dev/$dax" || true
	export SVM_DAX_DEV=/dev/$dax
	shim 2 -t devdax_snapshot_order_and_read -t devdax_unbind_invalidates
	e2e 'DevDax.*'
	unset SVM_DAX_DEV
else
	cat "$SVM_VM_SCRATCH/ns.json"
	fail "cannot configure namespace0.0 as devdax"
fi

# ------------------------------------------------------------------ fsdax
mnt=$SVM_VM_SCRATCH/pmem
mkdir -p "$mnt"
if ndctl create-namespace -f -e namespace0.0 -m fsdax -a 2M >"$SVM_VM_SCRATCH/ns.json" 2>&1; then
	pmem=/dev/$(sed -n 's/.*"blockdev":"\(pmem[0-9.]*\)".*/\1/p' "$SVM_VM_SCRATCH/ns.json" | head -1)
	[[ $pmem != /dev/ ]] || pmem=/dev/pmem0
	wait_for test -b "$pmem" || true
	echo "== [$k] fsdax $pmem on $mnt"
	if mkfs.ext4 -q -F -b 4096 -E stride=512,stripe_width=512 "$pmem" &&
		mount -o dax "$pmem" "$mnt"; then
		grep " $mnt " /proc/mounts
		export SVM_DAX_DIR=$mnt SVM_DAX_MNT=$mnt SVM_DAX_PMEM=$pmem
		shim 3 -t fsdax_snapshot_order_and_read -t fsdax_truncate_invalidates \
			-t fsdax_punch_hole_invalidates
		e2e 'FsDax.*'
		grep -q " $mnt " /proc/mounts && { umount "$mnt" || fail "umount $mnt at the end"; }
	else
		fail "cannot make and mount ext4 -o dax on $pmem"
	fi
else
	cat "$SVM_VM_SCRATCH/ns.json"
	fail "cannot configure namespace0.0 as fsdax"
fi

echo "== [$k] unload"
if ! rmmod svm_shim; then
	fail "rmmod svm_shim"
fi
echo "== [$k] dax suite rc=$rc"
exit $rc
