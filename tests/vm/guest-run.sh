#!/bin/bash
# Runs inside the guest, chrooted into the host root (see run-vm.sh).
run=$1
# shellcheck disable=SC1091
source "$run/vars"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export SVM_VM_KERNEL SVM_VM_KVER SVM_VM_MODROOT SVM_VM_MODULE
export SVM_VM_SCRATCH=/run/svm-scratch
mkdir -p "$SVM_VM_SCRATCH"
# The kernel booted and reached the host root: a panic from here on is the
# run's (run-vm.sh boots again only when this file is missing).
: >"$run/booted"
# Automatic NUMA balancing off (the guest has two NUMA nodes). It migrates
# an exporter's pages toward the node of the svmd thread whose
# hmm_range_fault() touched them, and each migration is an mmu notifier
# CLEAR: importers see an invalidation of that page (correct: the page
# moved) that no test asked for, and the tests that count fetched and
# landed pages exactly race it (seen in CI on 6.1: zero_copy_test's
# refetch after a 2-page remap counted all 8 cached pages). Measured: 10
# migrations in 3 runs of that test with balancing on, none with it off.
echo 0 >/proc/sys/kernel/numa_balancing 2>/dev/null || true
mp() { modprobe -d "$SVM_VM_MODROOT" "$@"; }

finish() {
	dmesg >"$run/dmesg" 2>&1
	echo "$1" >"$run/rc"
	sync
	exit 0
}

if [[ -n $SVM_VM_MODULE ]]; then
	if ! insmod "$SVM_VM_MODULE"; then
		echo "guest: insmod $SVM_VM_MODULE failed"
		finish 125
	fi
	udevadm settle >/dev/null 2>&1 || true
	[[ -c /dev/svm_shim ]] || { echo "guest: no /dev/svm_shim"; finish 125; }
fi

# Soft-RoCE: rxe0 on one end of a veth pair. Reported, never fatal here.
rxe() {
	mp crc32_generic 2>/dev/null # 6.1 under TCG needs the generic crc32
	mp ib_uverbs || return 1
	mp rdma_rxe || return 1
	mp veth || return 1
	ip link add v0 type veth peer name v1 || return 1
	ip addr add 10.77.0.1/24 dev v0 && ip addr add 10.77.0.2/24 dev v1
	# Jumbo frames, as RoCE deployments use: rxe's active MTU becomes 4096
	# (one page per packet). At the default 1500 (rxe MTU 1024) rxe ODP in
	# Linux 7.2.13 corrupts multi-packet messages (tests/vm/rdma/README.md);
	# svmd's ODP data check would then register pinned.
	ip link set v0 mtu 9000 && ip link set v1 mtu 9000
	ip link set v0 up && ip link set v1 up && ip link set lo up
	rdma link add rxe0 type rxe netdev v0 || return 1
	ibv_devices 2>/dev/null | grep -q rxe0 || return 1
}
# With a NIC (run-vm.sh --net/--addr: two guests on one wire), rxe0 sits on
# it instead: the guest's first ethernet device, addressed SVM_VM_NET_ADDR/24.
rxe_nic() {
	mp crc32_generic 2>/dev/null
	mp virtio_net 2>/dev/null # built in on 7.x
	mp ib_uverbs || return 1
	mp rdma_rxe || return 1
	local dev
	for dev in /sys/class/net/*; do
		[[ $(cat "$dev/type") == 1 && ${dev##*/} != v[01] ]] && break
	done
	SVM_VM_NET_DEV=${dev##*/}
	[[ -e /sys/class/net/$SVM_VM_NET_DEV ]] || { echo "no ethernet device"; return 1; }
	ip link set lo up
	ip addr add "$SVM_VM_NET_ADDR/24" dev "$SVM_VM_NET_DEV" || return 1
	ip link set "$SVM_VM_NET_DEV" mtu 9000 && ip link set "$SVM_VM_NET_DEV" up || return 1
	rdma link add rxe0 type rxe netdev "$SVM_VM_NET_DEV" || return 1
	ibv_devices 2>/dev/null | grep -q rxe0 || return 1
}
if [[ -n ${SVM_VM_NET_ADDR:-} ]]; then
	if rxe_nic >"$run/rxe.log" 2>&1; then
		SVM_VM_RXE="rxe0 up on $SVM_VM_NET_DEV ($SVM_VM_NET_ADDR)"
	else
		SVM_VM_RXE="unavailable: $(tail -1 "$run/rxe.log")"
	fi
	export SVM_VM_NET_ADDR SVM_VM_NET_DEV
elif rxe >"$run/rxe.log" 2>&1; then
	SVM_VM_RXE="rxe0 up on v0 (10.77.0.1)"
else
	SVM_VM_RXE="unavailable: $(tail -1 "$run/rxe.log")"
fi
export SVM_VM_RXE
echo "guest: kernel $SVM_VM_KVER ($SVM_VM_KERNEL), rxe: $SVM_VM_RXE"

cd "$SVM_VM_CWD" || finish 125
"${SVM_VM_CMD[@]}"
rc=$?
if [[ -n $SVM_VM_MODULE ]] && grep -q '^svm_shim ' /proc/modules; then
	if ! rmmod svm_shim; then
		echo "guest: rmmod svm_shim failed after the command"
		((rc != 0)) || rc=1
	fi
fi
finish $rc
