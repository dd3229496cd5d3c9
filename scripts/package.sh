#!/usr/bin/env bash
# Builds the Debian packages svm, svm-dkms and libsvm-dev with CPack DEB into
# ${SVM_PKG_DIR:-build-pkg} and checks them with lintian (fails on any
# lintian error). A separate build tree configured with prefix /usr (so the
# unit runs /usr/sbin/svmd, libraries go to /usr/lib/<multiarch>), building
# only what the packages contain. Extra arguments go to the CMake configure.
#   ./scripts/package.sh && ls build-pkg/*.deb
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${SVM_PKG_DIR:-$root/build-pkg}
jobs=${SVM_JOBS:-2}
"$root/scripts/install-deps.sh"
cmake -S "$root" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr \
  -DSVM_UNIT_TESTS=OFF -DSVM_VM_TESTS=OFF "$@" >/dev/null
ninja -C "$out" -j "$jobs" svmd svmctl svm-exporter svm_client svm_proto svm_man
rm -f "$out"/*.deb
(cd "$out" && cpack -G DEB >/dev/null)
debs=("$out"/*.deb)
echo "package: built ${debs[*]##*/}"
# --fail-on error: warnings are printed, errors fail the build.
lintian --fail-on error --tag-display-limit 0 "${debs[@]}"
echo "package: lintian reports no errors"
