#!/usr/bin/env bash
# Builds one libFuzzer target with clang (ASan + UBSan) in its own build
# directory and runs it for SECONDS on a copy of its seed corpus; any crash,
# leak or sanitizer report fails. Findings are kept in BUILD/findings.
#
#   run-fuzz.sh TARGET SECONDS [BUILD_DIR]     (default BUILD_DIR: build-fuzz)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${1:?target}
seconds=${2:?seconds}
build=${3:-$root/build-fuzz}
mkdir -p "$build"
(
	flock 9
	if [[ ! -f $build/build.ninja ]]; then
		CC=clang CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
			-DSVM_FUZZ=ON -DSVM_VM_TESTS=OFF -DSVM_UNIT_TESTS=OFF >"$build/configure.log" 2>&1 ||
			{ cat "$build/configure.log" >&2; exit 1; }
	fi
	ninja -C "$build" -j "${SVM_JOBS:-2}" "$target" >"$build/build-$target.log" 2>&1 ||
		{ cat "$build/build-$target.log" >&2; exit 1; }
) 9>"$build/.lock"
corpus=$build/corpus/$target
mkdir -p "$corpus" "$build/findings"
cp -n "$here/corpus/${target%_fuzz}"/* "$corpus/" 2>/dev/null || true
echo "fuzz $target for ${seconds}s (corpus $corpus)"
exec "$build/tests/fuzz/$target" -max_total_time="$seconds" -print_final_stats=1 \
	-artifact_prefix="$build/findings/$target-" "$corpus"
