#!/usr/bin/env bash
# The Debian packages of this build tree, built with CPack (the
# configuration scripts/package.sh uses, cmake/packaging.cmake) into OUT_DIR
# and checked by lintian: any error fails. Also the fixture svm_debs: the
# systemd VM test installs these packages.
#   - svm, svm-dkms and libsvm-dev are built;
#   - the packaged unit runs /usr/sbin/svmd --flagfile=/etc/svm/svmd.conf,
#     which svm ships as a conffile; dkms.conf says VERSION;
#   - lintian --fail-on error (warnings are printed).
# libsvm-dev's library directory follows this tree's configured prefix
# (/usr/lib from a /usr/local tree; scripts/package.sh configures /usr and
# gets /usr/lib/<multiarch>); the svm and svm-dkms packages are the same.
# usage: debs_test.sh BUILD_DIR OUT_DIR VERSION
set -euo pipefail
build=$1 out=$2 version=$3
fail() { echo "FAIL: $*" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
(cd "$build" && cpack -G DEB -B "$out" --config CPackConfig.cmake -D CPACK_INSTALL_PREFIX=/usr >"$out/cpack.log" 2>&1) ||
  { cat "$out/cpack.log" >&2; fail "cpack"; }
debs=()
for p in "svm_${version}_amd64" "svm-dkms_${version}_all" "libsvm-dev_${version}_amd64"; do
  [[ -f $out/$p.deb ]] || fail "$p.deb was not built: $(ls "$out")"
  debs+=("$out/$p.deb")
done
echo "== built ${debs[*]##*/}"
unit=$(dpkg-deb --fsys-tarfile "$out/svm_${version}_amd64.deb" | tar -xO ./usr/lib/systemd/system/svmd.service)
grep -qx 'ExecStart=/usr/sbin/svmd --flagfile=/etc/svm/svmd.conf' <<<"$unit" ||
  fail "the packaged unit does not run /usr/sbin/svmd --flagfile=/etc/svm/svmd.conf"
files=$(dpkg-deb --fsys-tarfile "$out/svm_${version}_amd64.deb" | tar -t)  # (grep -q would cut the pipe)
grep -qx './etc/svm/svmd.conf' <<<"$files" || fail "svm does not ship /etc/svm/svmd.conf"
conffiles=$(dpkg-deb --ctrl-tarfile "$out/svm_${version}_amd64.deb" | tar -xO ./conffiles)
grep -qx /etc/svm/svmd.conf <<<"$conffiles" || fail "/etc/svm/svmd.conf is not a conffile of svm"
conf=$(dpkg-deb --fsys-tarfile "$out/svm-dkms_${version}_all.deb" | tar -xO "./usr/src/svm_shim-$version/dkms.conf")
grep -qx "PACKAGE_VERSION=\"$version\"" <<<"$conf" || fail "dkms.conf does not say $version"
echo "== lintian"
rc=0
lintian --fail-on error --tag-display-limit 0 "${debs[@]}" >"$out/lintian.log" 2>&1 || rc=$?
grep -v '^running with root privileges' "$out/lintian.log" || true
((rc == 0)) || fail "lintian reports errors (exit $rc)"
echo "PASS"
