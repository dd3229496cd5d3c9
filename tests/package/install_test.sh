#!/usr/bin/env bash
# The install contract, on a DESTDIR install of this build tree:
#   - every file the svm, svm-dkms and libsvm-dev packages ship is installed,
#     for prefix /usr and for the default /usr/local;
#   - the installed unit names the installed svmd and passes
#     `systemd-analyze verify` (in a root made of the staged tree and the
#     host's systemd units), Documentation= included;
#   - the default configuration names no file that nothing creates;
#   - dkms.conf carries the project version;
#   - libsvm's installed headers include no protobuf, gRPC or generated
#     header: the third-party example compiles with a system include path
#     from which those are removed, and no generated header is installed;
#   - examples/third-party builds against the staged libsvm with CMake
#     (find_package(svm)) and with pkg-config, and runs.
# Lintian runs in scripts/package.sh (it needs the packages, i.e. a second
# build tree configured for /usr), not here.
# usage: install_test.sh BUILD_DIR SOURCE_DIR VERSION
set -euo pipefail
build=$1 src=$2 version=$3
work=$(mktemp -d /tmp/svm-install-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

install_to() {  # install_to DESTDIR PREFIX
  DESTDIR=$1 cmake --install "$build" --prefix "$2" >"$work/install.log" 2>&1 ||
    { cat "$work/install.log" >&2; fail "cmake --install --prefix $2"; }
}

verify_unit() {  # verify_unit STAGED_ROOT UNIT_PATH_IN_ROOT
  local r=$1 unit=$2
  command -v systemd-analyze >/dev/null || { echo "systemd-analyze not installed: verify skipped"; return 0; }
  # The staged tree plus the host's units (sysinit.target & co.) and the
  # host's kill(1), which ExecReload= runs.
  mkdir -p "$r/usr/lib/systemd/system"
  cp -an /usr/lib/systemd/system/. "$r/usr/lib/systemd/system/" 2>/dev/null || true
  [[ -x /bin/kill ]] && install -D -m 0755 /bin/kill "$r/bin/kill"
  local man=(--man=no)
  command -v man >/dev/null && man=(--man=yes)
  MANPATH=$r/usr/share/man:$r/usr/local/share/man systemd-analyze verify "${man[@]}" --root="$r" "$unit" ||
    fail "systemd-analyze verify $unit"
}

step "DESTDIR install, prefix /usr"
R=$work/root
install_to "$R" /usr
for f in usr/sbin/svmd usr/bin/svmctl usr/lib/systemd/system/svmd.service etc/svm/svmd.conf \
         usr/lib/sysusers.d/svm.conf usr/lib/tmpfiles.d/svm.conf usr/lib/modules-load.d/svm.conf \
         usr/lib/udev/rules.d/99-svm-shim.rules usr/share/man/man8/svmd.8.gz usr/share/man/man8/svmctl.8.gz \
         usr/share/doc/svm/operations.md usr/include/svm/client.h usr/include/svm/svm.h usr/include/svm/types.h \
         "usr/src/svm_shim-$version/dkms.conf" "usr/src/svm_shim-$version/svm_shim.c"; do
  [[ -e $R/$f ]] || fail "not installed: /$f"
done
libdir=$(dirname "$(cd "$R/usr" && find . -name svm.pc | head -n 1)")
libdir=${libdir#./}; libdir=${libdir%/pkgconfig}
[[ -f $R/usr/$libdir/libsvm.a && -f $R/usr/$libdir/cmake/svm/svmConfig.cmake ]] ||
  fail "libsvm.a or the CMake package missing under /usr/$libdir"
unit=$R/usr/lib/systemd/system/svmd.service
grep -qx 'ExecStart=/usr/sbin/svmd .*' "$unit" || fail "ExecStart does not run /usr/sbin/svmd: $(grep ExecStart "$unit")"
grep -qx 'ExecStart=/usr/sbin/svmd --flagfile=/etc/svm/svmd.conf' "$unit" ||
  fail "ExecStart does not pass --flagfile=/etc/svm/svmd.conf: $(grep ExecStart "$unit")"
! grep -q 'EnvironmentFile' "$unit" || fail "the unit still reads an EnvironmentFile"
"$R/usr/sbin/svmd" --version | grep -qx "svmd $version" || fail "svmd --version"
"$R/usr/bin/svmctl" --version | grep -qx "svmctl $version" || fail "svmctl --version"

step "the default configuration starts: svmd accepts it, no flag names a file that nothing installs"
"$R/usr/sbin/svmd" --flagfile="$R/etc/svm/svmd.conf" --only_check_args ||
  fail "svmd refuses the installed /etc/svm/svmd.conf"
for f in $(sed -n 's/^--[a-z-]*-file=//p' "$R/etc/svm/svmd.conf"); do
  [[ -e $R$f ]] || fail "/etc/svm/svmd.conf passes $f, which nothing installs"
done

step "dkms.conf says $version"
grep -qx "PACKAGE_VERSION=\"$version\"" "$R/usr/src/svm_shim-$version/dkms.conf" || fail "dkms.conf version"

step "systemd-analyze verify (prefix /usr)"
verify_unit "$R" /usr/lib/systemd/system/svmd.service

step "DESTDIR install, prefix /usr/local: the unit follows the prefix"
L=$work/local
install_to "$L" /usr/local
lunit=$L/usr/local/lib/systemd/system/svmd.service
grep -qx 'ExecStart=/usr/local/sbin/svmd .*' "$lunit" || fail "ExecStart for /usr/local: $(grep ExecStart "$lunit")"
grep -qx 'ExecStart=/usr/local/sbin/svmd --flagfile=/usr/local/etc/svm/svmd.conf' "$lunit" ||
  fail "--flagfile for /usr/local: $(grep ExecStart "$lunit")"
[[ -f $L/usr/local/etc/svm/svmd.conf ]] || fail "svmd.conf not in /usr/local/etc/svm"
[[ ! -e $L/etc ]] || fail "an install with prefix /usr/local wrote to /etc"
verify_unit "$L" /usr/local/lib/systemd/system/svmd.service

step "libsvm's headers need no protobuf, gRPC or generated header"
[[ ! -e $R/usr/include/svm/v1 ]] || fail "generated headers installed: $(ls "$R/usr/include/svm/v1")"
# The compiler's own search path with /usr/include replaced by a copy that
# lacks protobuf (google/), gRPC and any svm headers installed on the host.
sysinc=$work/sysinc
mkdir -p "$sysinc"
for e in /usr/include/*; do
  case ${e##*/} in google|grpc|grpc++|grpcpp|svm) ;; *) ln -s "$e" "$sysinc/" ;; esac
done
search_path() {  # search_path COMPILER LANG: the <...> directories, one a line
  "$1" -x "$2" -E -v /dev/null 2>&1 | sed -n '/^#include <...> search starts here:/,/^End of search list/{//!p}' |
    sed 's/^ *//; s|^/usr/include$|'"$sysinc"'|'
}
isystem() {  # isystem ARRAY_NAME DIR...: -isystem flags of the DIRs
  local -n out=$1; shift
  out=()
  for d in "$@"; do
    [[ -e $d/google/protobuf || -e $d/grpcpp || -e $d/svm ]] && fail "$d holds protobuf, gRPC or svm headers"
    out+=(-isystem "$d")
  done
  [[ ${#out[@]} -gt 0 ]] || fail "no compiler search path"
}
export PKG_CONFIG_PATH=$R/usr/$libdir/pkgconfig
mapfile -t dirs < <(search_path "${CXX:-c++}" c++)
isystem cxx_path "${dirs[@]}"
mapfile -t dirs < <(search_path "${CC:-cc}" c)
isystem c_path "${dirs[@]}"
# shellcheck disable=SC2046  # pkg-config output is a word list
"${CXX:-c++}" -std=c++20 -nostdinc "${cxx_path[@]}" $(pkg-config --cflags svm) -fsyntax-only \
  "$src/examples/third-party/svm_hello.cc" 2>"$work/nopb.log" ||
  { cat "$work/nopb.log" >&2; fail "svm/client.h needs a header outside libsvm-dev and abseil"; }
# shellcheck disable=SC2046
"${CC:-cc}" -nostdinc "${c_path[@]}" $(pkg-config --cflags svm) -fsyntax-only \
  "$src/examples/third-party/svm_hello_c.c" 2>"$work/nopb.log" ||
  { cat "$work/nopb.log" >&2; fail "svm/svm.h needs a header outside libsvm-dev"; }

step "third-party example with CMake: find_package(svm)"
cmake -S "$src/examples/third-party" -B "$work/cmake" -G Ninja -DCMAKE_PREFIX_PATH="$R/usr" \
  -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; fail "configure example"; }
cmake --build "$work/cmake" >>"$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; fail "build example (CMake)"; }
grep -q -- "$src/client/include\|$build/proto" "$work/cmake/build.ninja" && fail "the example used the source tree"

step "third-party example with pkg-config"
pkg-config --validate svm || fail "svm.pc does not validate"
[[ $(pkg-config --modversion svm) == "$version" ]] || fail "svm.pc version"
mkdir -p "$work/pc"
make -C "$work/pc" -f "$src/examples/third-party/Makefile" VPATH="$src/examples/third-party" \
  >"$work/pc.log" 2>&1 || { cat "$work/pc.log" >&2; fail "build example (pkg-config)"; }

step "the examples (C++ and C API) run (no daemon: UNAVAILABLE, exit 1)"
for exe in "$work/cmake/svm_hello" "$work/pc/svm_hello" "$work/cmake/svm_hello_c" "$work/pc/svm_hello_c"; do
  set +e; out=$("$exe" "unix:$work/no.sock" 2>&1); rc=$?; set -e
  [[ $rc == 1 && $out == *UNAVAILABLE* ]] || fail "$exe: exit $rc: $out"
done
echo "PASS"
