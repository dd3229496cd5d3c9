#!/bin/bash
# Node B of the two-guest run (run-two-guests.sh), in its guest: serves the
# node agent (node-agent.sh) on SVM_VM_NET_ADDR:7000 until node A writes
# SHARED/a-done, then shows its NIC and rxe counters.
#   node-b.sh SHARED_DIR LIMIT_SECONDS
here=$(cd "$(dirname "$0")" && pwd)
shared=$1
limit=${2:-1500}
echo "node B: kernel $SVM_VM_KVER, rxe: $SVM_VM_RXE"
[[ $SVM_VM_RXE == "rxe0 up"* ]] || { echo "node B: no wire (rxe: $SVM_VM_RXE)" >"$shared/b-failed"; exit 1; }
ln -sf /proc/self/fd /dev/fd 2>/dev/null
# Static neighbours: under TCG a guest can stall long enough for ARP to give
# up, and connect() then fails "No route to host" for a while.
ip neigh replace 10.99.0.1 lladdr 52:54:00:00:00:01 dev "$SVM_VM_NET_DEV" nud permanent
# -t: after node A half-closes, wait for the answer (a "run" outlasts the default 0.5 s under TCG)
socat -t 300 "TCP-LISTEN:7000,bind=$SVM_VM_NET_ADDR,reuseaddr,fork" \
	EXEC:"$here/node-agent.sh $shared" 2>>"$shared/agent.log" &
agent=$!
for ((i = 0; i < 100; ++i)); do
	ss -Hltn "sport = :7000" | grep -q . && break
	sleep 0.1
done
echo "$SVM_VM_NET_ADDR" >"$shared/b-ready"
while [[ -d $shared && ! -e $shared/a-done ]] && ((SECONDS < limit)); do sleep 1; done
kill "$agent"
wait "$agent" 2>/dev/null
# Node A may power off before its connections' FINs reach us: svmds whose
# agent connection never closed are still running (and hold svm_shim).
for f in /run/svm-agent/*.pid; do
	[[ -e $f ]] || continue
	p=$(cat "$f")
	[[ $(cat "/proc/$p/comm" 2>/dev/null) == svmd ]] && kill -9 "$p"
done
for f in /run/svm-agent/*.pid; do
	[[ -e $f ]] || continue
	p=$(cat "$f")
	for ((i = 0; i < 100; ++i)); do
		[[ $(cat "/proc/$p/comm" 2>/dev/null) == svmd ]] || break
		sleep 0.1
	done
done
ip -s link show "$SVM_VM_NET_DEV"
echo "node B: rxe0 (non-zero): $(for f in /sys/class/infiniband/rxe0/ports/1/hw_counters/*; do
	v=$(cat "$f" 2>/dev/null) && [[ $v != 0 ]] && printf '%s=%s ' "${f##*/}" "$v"
done)"
[[ -e $shared/a-done ]] || { echo "node B: node A never finished"; exit 1; }
exit 0
