#!/usr/bin/env bash
# Builds svm with AddressSanitizer + UndefinedBehaviorSanitizer (gcc) in its
# own build directory and runs one CTest label there; any sanitizer report
# fails the test it happens in (halt_on_error, no recovery from UB).
#
#   run-sanitized.sh LABEL [BUILD_DIR]     (default BUILD_DIR: build-asan)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
label=${1:?label}
build=${2:-$root/build-asan}
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
mkdir -p "$build"
(
	flock 9
	if [[ ! -f $build/build.ninja ]]; then
		cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
			-DSVM_VM_TESTS=OFF -DSVM_SANITIZE_TIER=OFF -DSVM_FUZZ_SECONDS=0 \
			-DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
			>"$build/configure.log" 2>&1 || { cat "$build/configure.log" >&2; exit 1; }
	fi
	ninja -C "$build" -j "${SVM_JOBS:-2}" >"$build/build.log" 2>&1 || { tail -50 "$build/build.log" >&2; exit 1; }
) 9>"$build/.lock"
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$build"
exec ctest -L "^$label\$" -j "${SVM_TEST_JOBS:-2}" --output-on-failure --timeout 300
