#!/usr/bin/env bash
# Resolve, download and unpack one Debian kernel for the VM tier, and (for a
# kernel whose compiler the host lacks) a minimal chroot of the same suite
# with that compiler. Nothing is installed on the host: everything lands
# under the cache directory, keyed by kernel version.
#
#   prepare-kernel.sh --kernel stable|unstable --cache DIR
#
# Prints the path of an env file (KVER, ROOT, VMLINUZ, HDRS, BUILD_CHROOT, CC)
# on its last line. Idempotent: a finished step leaves a stamp and is skipped.
set -euo pipefail

kernel=
cache=
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	*) echo "prepare-kernel: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ $kernel == stable || $kernel == unstable ]] ||
	{ echo "prepare-kernel: --kernel stable|unstable" >&2; exit 2; }
[[ -n $cache ]] || { echo "prepare-kernel: --cache DIR required" >&2; exit 2; }
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
log() { echo "prepare-kernel[$kernel]: $*" >&2; }
die() { echo "prepare-kernel[$kernel]: FATAL: $*" >&2; exit 1; }

mirror=http://deb.debian.org/debian
case $kernel in
stable) suite=bookworm ;;
unstable) suite=sid ;;
esac

# A private apt configuration per suite: the host's sources, lists and
# package state are never touched.
aptdir=$cache/apt-$suite
mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial" "$aptdir/etc"
{
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
	# Stable kernels are updated through the point-release and security suites.
	if [[ $suite == bookworm ]]; then
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite-updates main"
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/debian}/debian-security $suite-security main"
	fi
} >"$aptdir/etc/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$aptdir/etc/sources.list"
	-o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$aptdir/lists"
	-o "Dir::Cache=$aptdir" -o "Dir::Cache::archives=$aptdir/archives"
	-o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
	-o "APT::Get::List-Cleanup=0")
# Refresh the package lists at most every 6 hours.
stamp=$aptdir/updated
if [[ ! -f $stamp ]] || (($(date +%s) - $(stat -c %Y "$stamp") > 21600)); then
	log "apt update ($suite)"
	apt-get "${aptopts[@]}" -q update >"$aptdir/update.log" 2>&1 ||
		{ cat "$aptdir/update.log" >&2; die "apt update of $suite failed"; }
	touch "$stamp"
fi

deps_of() { apt-cache "${aptopts[@]}" depends "$1" 2>/dev/null |
	sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: //p'; }

# The metapackage names the current ABI (e.g. 6.1.0-56-amd64, 7.2.13+deb14-amd64).
hdr_pkg=$(deps_of linux-headers-amd64 | grep -E '^linux-headers-.*-amd64$' | head -1)
[[ -n $hdr_pkg ]] || die "cannot resolve linux-headers-amd64 in $suite"
kver=${hdr_pkg#linux-headers-}
img_pkg=linux-image-$kver
log "resolved $suite kernel $kver"
case $kernel in
stable) [[ $kver == 6.1.* ]] || die "stable kernel $kver is not 6.1" ;;
unstable) [[ ${kver%%.*} -ge 7 ]] ||
	die "unstable suite offers $kver, not a 7.x kernel (mid-transition?)" ;;
esac

hdr_deps=$(deps_of "$hdr_pkg")
img_deps=$(deps_of "$img_pkg")
pkgs=("$hdr_pkg" "$img_pkg")
mapfile -t -O ${#pkgs[@]} pkgs < <(echo "$hdr_deps" | { grep -E '^linux-(headers|kbuild)-' || true; } | sort -u)
mapfile -t -O ${#pkgs[@]} pkgs < <(echo "$img_deps" | { grep -E '^linux-(binary|modules)-' || true; } | sort -u)
# The compiler the headers were built with: gcc-N-for-host (7.x) or
# linux-compiler-gcc-N-x86 (6.1).
gccv=$(echo "$hdr_deps" | sed -n 's/^gcc-\([0-9]*\)-for-host$/\1/p; s/^linux-compiler-gcc-\([0-9]*\)-x86$/\1/p' | head -1)
[[ -n $gccv ]] || die "cannot tell which gcc $hdr_pkg needs"

kdir=$cache/kernels/$kver
root=$kdir/root
if [[ ! -f $kdir/unpacked ]]; then
	rm -rf "$kdir"
	mkdir -p "$kdir/debs" "$root"
	log "downloading ${pkgs[*]}"
	(cd "$kdir/debs" && apt-get "${aptopts[@]}" -q download "${pkgs[@]}") \
		>"$kdir/download.log" 2>&1 ||
		{ cat "$kdir/download.log" >&2; die "download of $kver packages failed"; }
	for d in "$kdir"/debs/*.deb; do
		dpkg-deb -x "$d" "$root"
	done
	touch "$kdir/unpacked"
fi

moddir=$root/lib/modules/$kver
[[ -d $moddir ]] || moddir=$root/usr/lib/modules/$kver
[[ -d $moddir ]] || die "no modules directory for $kver"
vmlinuz=$root/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || vmlinuz=$moddir/vmlinuz
[[ -f $vmlinuz ]] || die "no vmlinuz for $kver"
hdrs=/usr/src/linux-headers-$kver
[[ -d $root$hdrs ]] || die "no headers tree for $kver"
if [[ ! -f $kdir/depmod.done ]]; then
	# depmod -b wants ROOT/lib/modules/VER.
	if [[ $moddir == "$root/usr/lib/modules/$kver" && ! -e $root/lib/modules ]]; then
		mkdir -p "$root/lib" && ln -s ../usr/lib/modules "$root/lib/modules"
	fi
	depmod -b "$root" "$kver"
	touch "$kdir/depmod.done"
fi

# Which compiler to build with: the host's when it matches, else a
# debootstrapped chroot of the kernel's own suite holding gcc-N.
host_gccv=$(gcc -dumpversion 2>/dev/null | cut -d. -f1 || true)
chroot_dir=
cc=gcc-$gccv
if [[ $host_gccv != "$gccv" ]]; then
	chroot_dir=$cache/chroot-$suite-gcc$gccv
	if [[ ! -f $chroot_dir/.svm-ready ]]; then
		rm -rf "$chroot_dir"
		log "debootstrap $suite with gcc-$gccv (one-time, ~1 min)"
		debootstrap --variant=minbase \
			--include="gcc-$gccv,make,libc6-dev,xz-utils,kmod,libelf1t64,pahole,bc" \
			"$suite" "$chroot_dir" "$mirror" >"$cache/debootstrap-$suite.log" 2>&1 ||
			{ tail -30 "$cache/debootstrap-$suite.log" >&2
			  die "debootstrap of $suite with gcc-$gccv failed: no matching toolchain"; }
		touch "$chroot_dir/.svm-ready"
	fi
	[[ -x $chroot_dir/usr/bin/x86_64-linux-gnu-gcc-$gccv ]] ||
		die "chroot has no gcc-$gccv"
	cc=x86_64-linux-gnu-gcc-$gccv
elif ! command -v "$cc" >/dev/null; then
	die "host has no $cc"
fi

env=$kdir/env
cat >"$env" <<EOT
KVER=$kver
KSUITE=$suite
ROOT=$root
MODDIR=$moddir
VMLINUZ=$vmlinuz
HDRS=$hdrs
BUILD_CHROOT=$chroot_dir
KCC=$cc
EOT
echo "$env"
