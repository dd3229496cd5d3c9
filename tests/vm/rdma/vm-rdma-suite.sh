#!/usr/bin/env bash
# One CTest entry: boot one kernel (rxe0 up on v0 = 10.77.0.1) and run the
# verbs foundation's gtest binary in it.
#
#   vm-rdma-suite.sh --kernel stable|unstable --cache DIR --log DIR -- COMMAND...
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kernel=
cache=
logs=
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--log) logs=$2; shift 2 ;;
	--) shift; break ;;
	*) echo "vm-rdma-suite: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $logs && $# -gt 0 ]] ||
	{ echo "vm-rdma-suite: --kernel, --cache, --log and a command are required" >&2; exit 2; }
"$here/install-vm-deps.sh"
rm -rf "$logs"
mkdir -p "$(dirname "$logs")"
start=$(date +%s)
rc=0
"$here/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs" --timeout 900 --smp 1 -- \
	bash -c 'echo "== rdma verbs (kernel $SVM_VM_KVER, rxe: $SVM_VM_RXE)"; exec "$@"' vm-rdma "$@" || rc=$?
echo "vm_rdma_$kernel: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
