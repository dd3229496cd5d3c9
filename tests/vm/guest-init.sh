#!/bin/busybox sh
# shellcheck shell=dash
# /init of the VM tier's initramfs: mount the host root (virtio-9p), prepare
# it as a chroot and hand over to guest-run.sh in the run directory.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /mods/order); do
	insmod "/mods/$m" || echo "init: insmod $m failed"
done
run=
for w in $(cat /proc/cmdline); do
	case $w in svm.run=*) run=${w#svm.run=} ;; esac
done
H=/mnt/host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap hostroot $H; then
	echo "init: cannot mount the host root"
	poweroff -f
fi
mount -t proc proc $H/proc
mount -t sysfs sysfs $H/sys
mount -t devtmpfs devtmpfs $H/dev
mkdir -p $H/dev/pts $H/dev/shm
mount -t devpts devpts $H/dev/pts
mount -t tmpfs tmpfs $H/dev/shm
# Guest-local /run: no host daemon sockets leak in; scratch space for tests.
mount -t tmpfs tmpfs $H/run
mount -t debugfs debugfs $H/sys/kernel/debug 2>/dev/null
chroot $H /bin/bash "$run/guest-run.sh" "$run"
sync
poweroff -f
