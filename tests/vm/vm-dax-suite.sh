#!/usr/bin/env bash
# One CTest entry of the VM tier: boot one kernel with emulated persistent
# memory (memmap=512M!2G in a 3 GiB guest: an e820 pmem region) and run the
# DAX suite in it (dax-guest.sh): svm_shim on device-dax and fsdax, and
# svmd end to end over tcp and rdma with the teardown tests.
#
#   vm-dax-suite.sh --kernel stable|unstable --cache DIR --build DIR [--expect-odp]
#                   [--transports "tcp rdma"] -- DAX_TEST
#
# --transports: the svmd end-to-end runs (default both). CTest passes rdma
# only (6.1: the staged path, pinned DAX refused; 7.x: zero-copy ODP) to
# stay within the tier's time budget; tcp runs by hand.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=digest.sh
source "$here/digest.sh"
kernel=
cache=
build=
expect_odp=
transports="tcp rdma"
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--expect-odp) expect_odp=--expect-odp; shift ;;
	--transports) transports=$2; shift 2 ;;
	--) shift; break ;;
	*) echo "vm-dax-suite: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build && $# -eq 1 ]] ||
	{ echo "vm-dax-suite: --kernel, --cache, --build and the dax_test binary are required" >&2; exit 2; }
"$here/install-vm-deps.sh"
mkdir -p "$build"
build=$(cd "$build" && pwd)
"$here/build-tools.sh" "$build/vm-bin"
logs=$build/vm-logs/dax-$kernel
rm -rf "$logs"
start=$(date +%s)
rc=0
run_digested "$logs/output.log" "$here/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs" --timeout 900 --smp 1 \
	--mem 3072 --append 'memmap=512M!2G' -- \
	env SVM_DAX_TRANSPORTS="$transports" bash "$here/dax-guest.sh" "$build/vm-bin" "$1" $expect_odp || rc=$?
echo "vm_dax_$kernel: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
