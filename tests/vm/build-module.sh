#!/usr/bin/env bash
# Build driver-shim/svm_shim.ko for one prepared kernel, out of the source
# tree (a copy under the cache), and fail on any compiler warning.
#
#   build-module.sh ENV_FILE OUT_DIR
#
# ENV_FILE comes from prepare-kernel.sh. The module lands in OUT_DIR. A
# module built from the same sources (driver-shim/ and this script) for the
# same kernel and compiler is kept (OUT_DIR/svm_shim.sum): every VM entry
# calls this, and a rebuild costs about 10 s.
set -euo pipefail
env_file=$1
out=$2
# shellcheck disable=SC1090
source "$env_file"
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../driver-shim" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
log() { echo "build-module[$KVER]: $*" >&2; }

copy_src() { # DEST
	rm -rf "$1"
	mkdir -p "$1"
	cp -a "$src/." "$1/"
}

sum=$( { cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
	sha256sum <"$here/build-module.sh"; echo "$KVER $KCC ${BUILD_CHROOT:-host}"; } | sha256sum | cut -c1-16)
if [[ -f $out/svm_shim.ko && $(cat "$out/svm_shim.sum" 2>/dev/null) == "$sum" ]]; then
	log "up to date: $out/svm_shim.ko"
	exit 0
fi
rm -f "$out/svm_shim.sum"
blog=$out/build.log
if [[ -z $BUILD_CHROOT ]]; then
	# The host compiler matches. The headers' Makefile includes the common
	# tree by absolute path: point it at the unpacked copy.
	hdir=$ROOT$HDRS
	sed -i "s#^include /usr/src/#include $ROOT/usr/src/#" "$hdir/Makefile"
	bdir=$out/src
	copy_src "$bdir"
	log "make -C $hdir M=$bdir CC=$KCC"
	make -C "$hdir" M="$bdir" CC="$KCC" modules >"$blog" 2>&1 ||
		{ cat "$blog" >&2; log "FAILED"; exit 1; }
else
	# The kernel needs a compiler the host lacks: build in the chroot,
	# with the headers and kbuild trees copied in at their own paths.
	# HDRS/scripts points into the kbuild tree (/usr/lib/linux-kbuild-VER).
	kb=$(readlink -f "$ROOT$HDRS/scripts")
	kb=${kb%/scripts}
	kb=${kb#"$ROOT"}
	stamp=$BUILD_CHROOT/.svm-headers-$KVER
	if [[ ! -f $stamp ]]; then
		log "copying headers of $KVER into the build chroot"
		mkdir -p "$BUILD_CHROOT/usr/src" "$BUILD_CHROOT/usr/lib"
		cp -a "$ROOT"/usr/src/linux-headers-"${KVER%-amd64}"* "$BUILD_CHROOT/usr/src/"
		cp -a "$ROOT$kb" "$BUILD_CHROOT/usr/lib/"
		touch "$stamp"
	fi
	bdir_in=/build/svm_shim-$KVER
	bdir=$BUILD_CHROOT$bdir_in
	copy_src "$bdir"
	log "chroot make -C $HDRS M=$bdir_in CC=$KCC"
	mountpoint -q "$BUILD_CHROOT/proc" || mount -t proc proc "$BUILD_CHROOT/proc"
	rc=0
	chroot "$BUILD_CHROOT" make -C "$HDRS" M="$bdir_in" CC="$KCC" modules \
		>"$blog" 2>&1 || rc=$?
	umount "$BUILD_CHROOT/proc" || true
	((rc == 0)) || { cat "$blog" >&2; log "FAILED"; exit 1; }
fi
if grep -E 'warning:|error:' "$blog" >&2; then
	log "FAILED: the build is not warning-free"
	exit 1
fi
cp "$bdir/svm_shim.ko" "$out/svm_shim.ko"
echo "$sum" >"$out/svm_shim.sum"
log "built $out/svm_shim.ko"
