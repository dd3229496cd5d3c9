#!/usr/bin/env bash
# Boot a Debian kernel under QEMU (TCG) with the host root shared read-write
# over virtio-9p and chrooted into, load svm_shim (and bring up Soft-RoCE
# rxe0 when possible), run one command as root in the guest chroot with the
# current directory preserved, stream its output, and propagate its exit
# status. The guest dmesg is saved and scanned: a BUG/WARNING/Oops/KASAN/
# general protection line fails the run.
#
#   run-vm.sh --kernel stable|unstable --cache DIR [options] -- COMMAND...
#     --log DIR        where to keep dmesg and the console log (default:
#                      CACHE/runs/KERNEL-TIMESTAMP)
#     --no-module      do not load svm_shim (the caller loads it)
#     --timeout SEC    kill the guest after SEC seconds (default 1200)
#     --mem MB         guest memory, split over two NUMA nodes (default 2048)
#     --smp N          vCPUs, 1 or 2 (default 2; $SVM_VM_SMP overrides both):
#                      with 2, one on each NUMA node; with 1, node 1 has
#                      memory only. Under TCG a 2-vCPU guest is slowed most
#                      by anything else on the host (a descheduled vCPU
#                      holds what the other spins on), so the suites that
#                      run beside other work boot with 1 (tests/vm/README.md)
#     --append ARGS    more kernel parameters (e.g. memmap=512M!2G: emulated pmem)
#     --prepare-only   download and unpack the kernel, build the module and
#                      the initramfs into the cache, and exit without booting
#                      (scripts/test.sh warms the cache this way while the
#                      host build runs; no COMMAND needed)
#     --net SPEC --addr IP
#                      a virtio-net NIC on the QEMU netdev SPEC (e.g.
#                      dgram,local.type=inet,...: two guests on one wire,
#                      tests/vm/nodes) with address IP/24 in the guest, and
#                      rxe0 on it instead of the veth pair
#
# Inside the guest: SVM_VM_KERNEL, SVM_VM_KVER, SVM_VM_MODROOT (for
# `modprobe -d`), SVM_VM_MODULE (path of svm_shim.ko), SVM_VM_SCRATCH (a
# guest-local tmpfs directory), SVM_VM_RXE (rxe0 status) are set.
# Exit status: the command's; 124 on guest timeout; 125 on a harness error;
# 126 when the guest dmesg shows a kernel problem (and the command passed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kernel=
cache=
logdir=
load_module=1
tmo=1200
mem=2048
smp=2
append=
net=
addr=
prepare_only=0
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--log) logdir=$2; shift 2 ;;
	--no-module) load_module=0; shift ;;
	--timeout) tmo=$2; shift 2 ;;
	--mem) mem=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--append) append=$2; shift 2 ;;
	--net) net=$2; shift 2 ;;
	--addr) addr=$2; shift 2 ;;
	--prepare-only) prepare_only=1; shift ;;
	--) shift; break ;;
	*) echo "run-vm: unknown argument $1" >&2; exit 125 ;;
	esac
done
(($#)) || ((prepare_only)) || { echo "run-vm: no command given" >&2; exit 125; }
smp=${SVM_VM_SMP:-$smp}
[[ $smp == 1 || $smp == 2 ]] || { echo "run-vm: --smp must be 1 or 2, not $smp" >&2; exit 125; }
[[ -n $kernel && -n $cache ]] || { echo "run-vm: --kernel and --cache are required" >&2; exit 125; }
log() { echo "run-vm[$kernel]: $*" >&2; }
harness_fail() { log "FATAL: $*"; exit 125; }

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
env_file=$("$here/prepare-kernel.sh" --kernel "$kernel" --cache "$cache" | tail -1) ||
	harness_fail "kernel preparation failed"
# shellcheck disable=SC1090
source "$env_file"
out=$cache/out/$KVER
if ((load_module)); then
	"$here/build-module.sh" "$env_file" "$out" || harness_fail "module build failed"
fi

# --- initramfs: busybox + the modules needed to mount the 9p root ---------
initrd=$out/initrd.cpio.gz
initsum=$(cat "$here/guest-init.sh" "$env_file" | sha256sum | cut -c1-16)
if [[ ! -f $initrd || $(cat "$out/initrd.sum" 2>/dev/null) != "$initsum" ]]; then
	log "building initramfs for $KVER"
	ird=$out/initrd
	rm -rf "$ird"
	mkdir -p "$ird"/{bin,mods,proc,sys,dev,mnt/host}
	cp /bin/busybox "$ird/bin/busybox"
	cp "$here/guest-init.sh" "$ird/init"
	chmod +x "$ird/init"
	: >"$ird/mods/order"
	# Dependency order straight from the kernel's own modules.dep.
	while read -r kind path _; do
		[[ $kind == insmod ]] || continue
		name=$(basename "$path")
		case $name in
		*.ko.xz) xz -dc "$path" >"$ird/mods/${name%.xz}"; name=${name%.xz} ;;
		*.ko.zst) zstd -qdc "$path" >"$ird/mods/${name%.zst}"; name=${name%.zst} ;;
		*) cp "$path" "$ird/mods/$name" ;;
		esac
		grep -qx "$name" "$ird/mods/order" || echo "$name" >>"$ird/mods/order"
	done < <(for m in virtio_pci 9pnet_virtio 9p; do
		modprobe -d "$ROOT" -S "$KVER" --show-depends "$m" 2>/dev/null || true
	done)
	grep -q '^9p.ko$' "$ird/mods/order" || harness_fail "no 9p module for $KVER"
	(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd"
	echo "$initsum" >"$out/initrd.sum"
fi
if ((prepare_only)); then
	log "prepared $KVER in $cache"
	exit 0
fi

# --- the run directory, shared with the guest through the 9p root ----------
if [[ -z $logdir ]]; then
	logdir=$cache/runs/$kernel-$(date +%Y%m%d-%H%M%S)-$$
fi
mkdir -p "$logdir"
logdir=$(cd "$logdir" && pwd)
rm -f "$logdir/rc" "$logdir/dmesg" "$logdir/module-rc" "$logdir/booted"
modroot=$ROOT
{
	printf 'SVM_VM_KERNEL=%q\n' "$kernel"
	printf 'SVM_VM_KVER=%q\n' "$KVER"
	printf 'SVM_VM_MODROOT=%q\n' "$modroot"
	printf 'SVM_VM_MODULE=%q\n' "$( ((load_module)) && echo "$out/svm_shim.ko")"
	printf 'SVM_VM_CWD=%q\n' "$PWD"
	printf 'SVM_VM_NET_ADDR=%q\n' "$addr"
	printf 'SVM_VM_CMD=('
	printf '%q ' "$@"
	printf ')\n'
} >"$logdir/vars"
cp "$here/guest-run.sh" "$logdir/guest-run.sh"

nic=(-nic none)
if [[ -n $net ]]; then
	[[ -n $addr ]] || harness_fail "--net needs --addr"
	IFS=. read -r _ _ o3 o4 <<<"$addr"
	nic=(-netdev "$net,id=n0" -device "virtio-net-pci,netdev=n0,mac=$(printf '52:54:00:00:%02x:%02x' "$o3" "$o4")")
fi
half=$((mem / 2))
if ((smp == 2)); then
	cpus=(-smp 2,sockets=2,cores=1,threads=1)
	node1=node,nodeid=1,cpus=1,memdev=m1
	vcpus="2 vCPUs"
else
	cpus=(-smp 1)
	node1=node,nodeid=1,memdev=m1
	vcpus="1 vCPU"
fi
# One boot of the guest; its exit status in qrc (124: timed out).
boot() {
	log "booting $KVER (TCG, $vcpus, ${mem} MiB over 2 NUMA nodes); log in $logdir"
	qrc=0
	timeout --foreground -k 10 "$tmo" qemu-system-x86_64 \
		-accel tcg -cpu max "${cpus[@]}" -m "$mem" \
		-object memory-backend-ram,id=m0,size="${half}M" \
		-object memory-backend-ram,id=m1,size="$((mem - half))M" \
		-numa node,nodeid=0,cpus=0,memdev=m0 \
		-numa "$node1" \
		-kernel "$VMLINUZ" -initrd "$initrd" \
		-append "console=ttyS0 loglevel=4 panic=-1 svm.run=$logdir${append:+ $append}" \
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap \
		-display none -monitor none -serial stdio "${nic[@]}" -no-reboot \
		</dev/null 2>&1 | tee "$logdir/console.log" || qrc=${PIPESTATUS[0]}
}
boot
# A guest kernel that panics while booting, before guest-run.sh has
# reached the host root (no $logdir/booted), is booted once more. Seen in a
# CI run on 2026-12-01: 7.2 under TCG with 2 vCPUs took an int3 oops in the
# scheduler during the initcalls (likely the kernel patching its own text
# while the other vCPU ran it), before any module or command of the run.
# The first console is kept as console-boot1.log and the retry is logged.
# A panic after that point, or a second one, fails the run as before.
if ((qrc != 124)) && [[ ! -f $logdir/booted && ! -f $logdir/rc ]] &&
	grep -q 'Kernel panic' "$logdir/console.log"; then
	mv "$logdir/console.log" "$logdir/console-boot1.log"
	log "the guest kernel panicked while booting, before the run began (console-boot1.log): booting again"
	boot
fi
if ((qrc == 124)); then
	log "FAIL: guest timed out after ${tmo}s"
	exit 124
fi
[[ -f $logdir/rc ]] || harness_fail "guest did not report an exit status (qemu rc $qrc); see $logdir/console.log"
rc=$(cat "$logdir/rc")
[[ -f $logdir/dmesg ]] || harness_fail "guest dmesg missing"
if grep -nE 'BUG|WARNING|Oops|KASAN|general protection' "$logdir/dmesg" >"$logdir/dmesg.hits"; then
	log "FAIL: kernel problems in guest dmesg ($logdir/dmesg):"
	cat "$logdir/dmesg.hits" >&2
	((rc != 0)) || rc=126
fi
log "guest command exit status $rc"
exit "$rc"
