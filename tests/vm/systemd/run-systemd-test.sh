#!/usr/bin/env bash
# The systemd VM test: a Debian bookworm guest with systemd as PID 1 on the
# VM tier's stable kernel (build-image.sh), booted twice under QEMU (TCG)
# from a per-run copy of the cached disk image:
#   boot 1 (install): the svm-dkms and svm .debs are installed with dpkg;
#          DKMS must build and install svm_shim for the running kernel, the
#          postinst must enable and start svmd.service;
#   boot 2 (check):   svm_shim loaded at boot by systemd-modules-load, udev's
#          /dev/svm_shim owner and mode, start via READY=1, imports through
#          the service in both directions with a second svmd, reload keeps
#          imports, the watchdog restarts a SIGSTOPped svmd, a clean stop,
#          journald priorities (guest-test.sh says exactly what is checked).
#
#   run-systemd-test.sh --kernel stable --cache DIR --debs DIR [--log DIR] [--timeout SEC]
#
# DIR (--debs) holds svm_*.deb and svm-dkms_*.deb. Exit status 0 when both
# boots passed every check; 124 on a guest timeout; 125 on a harness error;
# 126 when a guest dmesg shows a kernel problem (and the checks passed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernel='' cache='' debs='' logdir='' tmo=900
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--debs) debs=$2; shift 2 ;;
	--log) logdir=$2; shift 2 ;;
	--timeout) tmo=$2; shift 2 ;;
	*) echo "run-systemd-test: unknown argument $1" >&2; exit 125 ;;
	esac
done
log() { echo "run-systemd-test[$kernel]: $*" >&2; }
harness_fail() { log "FATAL: $*"; exit 125; }
[[ $kernel == stable ]] || harness_fail "--kernel stable (the only kernel with an image recipe)"
[[ -n $cache && -n $debs ]] || harness_fail "--cache and --debs are required"
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
debs=$(cd "$debs" && pwd)

env_file=$("$here/../prepare-kernel.sh" --kernel "$kernel" --cache "$cache" | tail -1) ||
	harness_fail "kernel preparation failed"
img=$("$here/build-image.sh" --cache "$cache" --env "$env_file" --debs "$debs" | tail -1) ||
	harness_fail "image build failed"

[[ -n $logdir ]] || logdir=$cache/runs/systemd-$kernel-$(date +%Y%m%d-%H%M%S)-$$
rm -rf "$logdir"
mkdir -p "$logdir/share/debs"
logdir=$(cd "$logdir" && pwd)
share=$logdir/share
cp "$debs"/svm_*.deb "$debs"/svm-dkms_*.deb "$share/debs/"
cp "$here/guest-test.sh" "$share/"
# A private copy of the image: both boots write to it, the cache stays pristine.
cp --sparse=always "$img/root.img" "$logdir/disk.img"

boot() {  # boot PHASE
	local phase=$1 qrc=0
	echo "$phase" >"$share/phase"
	rm -f "$share/rc-$phase"
	log "boot ($phase): systemd as PID 1; console in $logdir/console-$phase.log"
	timeout --foreground -k 10 "$tmo" qemu-system-x86_64 \
		-accel tcg -cpu max -smp 2 -m 2048 \
		-kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
		-append "root=/dev/vda rw console=ttyS0 loglevel=4 panic=-1 svm.test=1" \
		-drive file="$logdir/disk.img",format=raw,if=virtio,cache=unsafe \
		-virtfs local,path="$share",mount_tag=svmrun,security_model=none \
		-display none -monitor none -serial stdio -nic none -no-reboot \
		</dev/null >"$logdir/console-$phase.log" 2>&1 || qrc=$?
	[[ -f $share/guest-$phase.log ]] && cat "$share/guest-$phase.log"
	if ((qrc == 124)); then
		log "FAIL: guest timed out after ${tmo}s ($phase); tail of the console:"
		tail -20 "$logdir/console-$phase.log" >&2
		exit 124
	fi
	[[ -f $share/rc-$phase ]] ||
		{ tail -30 "$logdir/console-$phase.log" >&2; harness_fail "the guest did not report ($phase; qemu rc $qrc)"; }
	local rc
	rc=$(cat "$share/rc-$phase")
	if grep -nE 'BUG|WARNING|Oops|KASAN|general protection' "$share/dmesg-$phase" >"$logdir/dmesg-$phase.hits"; then
		log "FAIL: kernel problems in the guest dmesg ($phase):"
		cat "$logdir/dmesg-$phase.hits" >&2
		((rc != 0)) || rc=126
	fi
	if ((rc != 0)); then
		log "FAIL: $phase exited $rc; journal in $share/journal-$phase.txt"
		exit "$rc"
	fi
}
boot install
boot check
rm -f "$logdir/disk.img"
log "PASS (logs in $logdir)"
