#!/usr/bin/env bash
# Builds the disk image the systemd VM test boots: a Debian bookworm system
# (systemd as PID 1, udev, dkms, gcc) with the VM tier's stable kernel and
# its headers installed from the very .debs prepare-kernel.sh downloaded,
# plus the runtime libraries the svm packages depend on. svm itself is NOT
# in the image: the test installs its .debs in the booted guest.
#
#   build-image.sh --cache DIR --env KERNEL_ENV --debs DIR
#   build-image.sh --cache DIR --env KERNEL_ENV --base-only
#
# KERNEL_ENV is prepare-kernel.sh's env file; DIR holds svm_*.deb and
# svm-dkms_*.deb (their Depends: fields name the libraries to preinstall).
# Prints the image directory (root.img, vmlinuz, initrd.img) on its last
# line. Two layers, both cached: the base root (debootstrap, the kernel,
# dkms and the guest driver unit: most of the time) under
# CACHE/systemd-image/base-KVER-KEY, KEY a hash of this script, the unit and
# the kernel's .debs; then the image, a copy of the base with the packages'
# libraries added, under CACHE/systemd-image/KVER-KEY2, KEY2 adding the
# dependency list. --base-only builds the base alone and needs no .debs
# (scripts/test.sh does it while the host build runs). Nothing on the host
# is installed or changed (debootstrap and apt run inside the new root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache='' env_file='' debs='' base_only=0
while (($#)); do
	case "$1" in
	--cache) cache=$2; shift 2 ;;
	--env) env_file=$2; shift 2 ;;
	--debs) debs=$2; shift 2 ;;
	--base-only) base_only=1; shift ;;
	*) echo "build-image: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $cache && -n $env_file && ( -n $debs || $base_only == 1 ) ]] ||
	{ echo "build-image: --cache, --env and --debs (or --base-only) are required" >&2; exit 2; }
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# shellcheck disable=SC1090
source "$env_file"
log() { echo "build-image[$KVER]: $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
[[ $KSUITE == bookworm ]] || die "only the stable (bookworm) kernel has an image recipe"
kdebs=$(dirname "$env_file")/debs
mapfile -t kernel_debs < <(ls "$kdebs"/linux-{image,headers,kbuild}-*.deb 2>/dev/null)
((${#kernel_debs[@]} >= 4)) || die "kernel .debs missing in $kdebs"

mirror=http://deb.debian.org/debian
root=
cleanup() {
	[[ -n $root ]] || return 0
	for m in dev/pts proc sys; do
		mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
	done
	return 0
}
trap cleanup EXIT
mount_root() {
	mount -t proc proc "$root/proc"
	mount -t sysfs sysfs "$root/sys"
	mount -t devpts devpts "$root/dev/pts"
	# Nothing starts inside the build chroot.
	printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
	chmod +x "$root/usr/sbin/policy-rc.d"
}
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

# --- the base: bookworm, the kernel, dkms, the guest driver unit ------------
base_key=$({ cat "$0" "$here/svm-vm-test.service" "$here/svm-vm-test"
	basename -a "${kernel_debs[@]}"; } | sha256sum | cut -c1-12)
base=$cache/systemd-image/base-$KVER-$base_key
if [[ ! -f $base/ready ]]; then
	rm -rf "$base"
	mkdir -p "$base"
	root=$base/rootfs
	blog=$base/build.log
	log "debootstrap bookworm (one-time, a few minutes; log $blog)"
	debootstrap --variant=minbase \
		--include=systemd-sysv,udev,dbus,kmod,procps,iproute2,initramfs-tools,ca-certificates \
		bookworm "$root" "$mirror" >"$blog" 2>&1 || { tail -30 "$blog" >&2; die "debootstrap failed"; }
	cat >"$root/etc/apt/sources.list" <<EOT
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOT
	mount_root
	mkdir -p "$root/tmp/kdebs"
	cp "${kernel_debs[@]}" "$root/tmp/kdebs/"
	mapfile -t in_root_debs < <(cd "$root/tmp/kdebs" && printf '/tmp/kdebs/%s\n' *.deb)
	log "apt: dkms, the kernel and its headers"
	{
		in_root apt-get -q update &&
			in_root apt-get -q install -y --no-install-recommends dkms "${in_root_debs[@]}" &&
			in_root apt-get clean
	} >>"$blog" 2>&1 || { tail -40 "$blog" >&2; die "apt in the base failed"; }
	# The package lists stay: the image layer installs from them.
	rm -rf "$root/tmp/kdebs" "$root/usr/sbin/policy-rc.d"
	[[ -d $root/usr/src/linux-headers-$KVER && -L $root/lib/modules/$KVER/build ]] || die "the headers of $KVER are not installed in the image"
	[[ -f $root/boot/initrd.img-$KVER ]] || die "no initramfs was generated for $KVER"

	echo svm-guest >"$root/etc/hostname"
	printf '127.0.0.1 localhost\n127.0.1.1 svm-guest\n' >"$root/etc/hosts"
	echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
	install -m 0755 "$here/svm-vm-test" "$root/usr/local/sbin/svm-vm-test"
	install -m 0644 "$here/svm-vm-test.service" "$root/etc/systemd/system/svm-vm-test.service"
	in_root systemctl enable svm-vm-test.service >>"$blog" 2>&1
	in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >>"$blog" 2>&1 || true
	cleanup
	root=
	touch "$base/ready"
	log "base ready: $base"
fi
if ((base_only)); then
	echo "$base"
	exit 0
fi

# --- the image: the base plus the svm packages' runtime libraries ----------
# Runtime dependencies of the svm packages, alternatives resolved to the first.
deps=()
for p in svm svm-dkms; do
	d=$(printf '%s\n' "$debs/${p}"_*.deb | head -1)
	[[ -f $d ]] || die "no $p .deb in $debs"
	mapfile -t -O ${#deps[@]} deps < <(dpkg-deb -f "$d" Depends |
		sed 's/([^)]*)//g; s/|[^,]*//g' | tr ',' '\n' | tr -d ' ' | sed '/^$/d')
done
mapfile -t deps < <(printf '%s\n' "${deps[@]}" | sort -u)

key=$({ echo "$base_key"; printf '%s\n' "${deps[@]}"; } | sha256sum | cut -c1-12)
out=$cache/systemd-image/$KVER-$key
if [[ -f $out/ready ]]; then
	echo "$out"
	exit 0
fi
rm -rf "$out"
mkdir -p "$out"
root=$out/rootfs
blog=$out/build.log
cp -a "$base/rootfs" "$root"
mount_root
log "apt: ${deps[*]}"
# From the base's package lists; lists that have gone stale since (a base
# kept for days: the archive moved on) are fetched again once.
install_deps() { in_root apt-get -q install -y --no-install-recommends "${deps[@]}"; }
{
	{ install_deps || { in_root apt-get -q update && install_deps; }; } &&
		in_root apt-get clean
} >>"$blog" 2>&1 || { tail -40 "$blog" >&2; die "apt in the image failed"; }
rm -rf "$root/usr/sbin/policy-rc.d" "$root"/var/lib/apt/lists/*_dists_*
cleanup

cp "$root/boot/vmlinuz-$KVER" "$out/vmlinuz"
cp "$root/boot/initrd.img-$KVER" "$out/initrd.img"
mb=$(du -sm "$root" | cut -f1)
log "mkfs.ext4 -d ($mb MiB of files)"
mkfs.ext4 -q -F -L svmroot -d "$root" "$out/root.img" "$((mb + 2048))M" >>"$blog" 2>&1 ||
	{ tail -20 "$blog" >&2; die "mkfs.ext4 -d failed"; }
rm -rf "$root"
touch "$out/ready"
echo "$out"
