#!/usr/bin/env bash
# Two QEMU guests of one kernel booted side by side, each with a virtio-net
# NIC on one emulated wire (QEMU dgram netdevs sending to each other over
# host UDP on 127.0.0.1), addresses 10.99.0.1 (node A) and 10.99.0.2
# (node B), rxe0 on each NIC, svm_shim loaded in both. Node B runs the node
# agent (node-agent.sh); node A runs the test binaries with one daemon there
# and the others on node B (node-a.sh). Both guests go through run-vm.sh:
# each guest's dmesg is scanned and svm_shim must unload in both.
#
#   run-two-guests.sh --kernel stable|unstable --cache DIR --build DIR
#                     [--transports "tcp rdma"] [--netem "loss 1% delay 20ms 5ms"]
#                     [--netem-tests REGEX] [--expect-odp] [--bench SVM_READ_BENCH] [--timeout SEC]
#                     -- TEST_BINARY[:GTEST_FILTER]...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vm=$(cd "$here/.." && pwd)
kernel=
tmo=
cache=
build=
a_args=()
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--timeout) tmo=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--transports | --netem | --netem-tests | --bench) a_args+=("$1" "$2"); shift 2 ;;
	--expect-odp) a_args+=("$1"); shift ;;
	--) shift; break ;;
	*) echo "run-two-guests: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build && $# -gt 0 ]] ||
	{ echo "run-two-guests: --kernel, --cache, --build and test binaries are required" >&2; exit 2; }
"$vm/install-vm-deps.sh"
mkdir -p "$build"
build=$(cd "$build" && pwd)
logs=$build/vm-logs/nodes-$kernel
rm -rf "$logs"
mkdir -p "$logs/shared"
# Prepare the kernel and module once, before two guests race for them (the
# initramfs: node A boots once node B's run-vm.sh has passed that point).
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
env_file=$("$vm/prepare-kernel.sh" --kernel "$kernel" --cache "$cache" | tail -1)
KVER=$(. "$env_file" && echo "$KVER")
"$vm/build-module.sh" "$env_file" "$cache/out/$KVER"
start=$(date +%s)
# Two free UDP ports for the wire (the dgram netdevs bind them).
read -r pa pb < <(python3 -c 'import socket
s=[socket.socket(socket.AF_INET,socket.SOCK_DGRAM) for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
wire() { echo "dgram,local.type=inet,local.host=127.0.0.1,local.port=$1,remote.type=inet,remote.host=127.0.0.1,remote.port=$2"; }
: "${tmo:=1500}"
"$vm/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs/b" --timeout "$tmo" \
	--net "$(wire "$pb" "$pa")" --addr 10.99.0.2 -- "$here/node-b.sh" "$logs/shared" $((tmo - 60)) \
	>"$logs/b.out" 2>&1 &
bpid=$!
while [[ ! -e $logs/b/vars ]] && kill -0 "$bpid" 2>/dev/null; do sleep 1; done
rc=0
"$vm/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs/a" --timeout "$tmo" \
	--net "$(wire "$pa" "$pb")" --addr 10.99.0.1 -- "$here/node-a.sh" "$logs/shared" "${a_args[@]}" -- "$@" ||
	rc=$?
touch "$logs/shared/a-done"
brc=0
wait "$bpid" || brc=$?
echo "---- node B (exit $brc; log $logs/b.out, svmd logs $logs/shared)"
grep -E '^node B|^run-vm|^guest:' "$logs/b.out" || true
((rc != 0)) || rc=$brc
echo "vm_nodes_$kernel: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
