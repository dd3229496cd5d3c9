#!/usr/bin/env bash
# Run bench_shim in a guest of the given kernel (a benchmark, not a test).
#   run-bench.sh --kernel stable|unstable --cache DIR --build DIR [-- BENCH_ARGS...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernel=
cache=
build=
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--) shift; break ;;
	*) echo "run-bench: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build ]] ||
	{ echo "run-bench: --kernel, --cache and --build are required" >&2; exit 2; }
"$here/install-vm-deps.sh"
mkdir -p "$build"
build=$(cd "$build" && pwd)
"$here/build-tools.sh" "$build/vm-bin"
exec "$here/run-vm.sh" --kernel "$kernel" --cache "$cache" \
	--log "$build/vm-logs/bench-$kernel" -- "$build/vm-bin/bench_shim" "$@"
