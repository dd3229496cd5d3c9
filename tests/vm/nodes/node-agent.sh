#!/bin/bash
# The node agent of the two-guest tier: one connection, one job. Run by
#   socat TCP-LISTEN:PORT,bind=ADDR,reuseaddr,fork EXEC:"node-agent.sh LOGDIR"
# on node B. The test harness (tests/integration/harness.cc, $SVM_TEST_REMOTE)
# sends one line of tab-separated words:
#   SVMD ARGS...     (without --control) starts svmd with a control socket
#                    of its own and answers "ready CONTROL" (or "failed: WHY");
#                    then "kill SIG" signals it and answers "exited STATUS"
#                    once it is gone; when the connection closes, svmd is
#                    killed (SIGKILL).
#   exec CMD ARGS... runs CMD on the connection (svm-remote-client: the
#                    Client of a daemon here, driven from node A).
#   run CMD ARGS...  runs CMD and answers "rc STATUS B64(STDOUT) B64(STDERR)"
#                    (svmctl against a daemon here).
logdir=$1
IFS=$'\t' read -r -a argv || exit 0
case ${argv[0]} in
exec) exec "${argv[@]:1}" 2>>"$logdir/remote-client.log" ;;
run)
	out=$(mktemp) err=$(mktemp)
	"${argv[@]:1}" </dev/null >"$out" 2>"$err"
	echo "rc $? $(base64 -w0 <"$out") $(base64 -w0 <"$err")"
	rm -f "$out" "$err"
	exit 0
	;;
esac
n=$({
	flock 9
	c=$(cat "$logdir/agent.count" 2>/dev/null || echo 0)
	echo $((c + 1)) >"$logdir/agent.count"
	echo $((c + 1))
} 9>"$logdir/agent.lock")
mkdir -p /run/svm-agent
sock=/run/svm-agent/d$n.sock
node=d$n
for ((i = 0; i < ${#argv[@]}; ++i)); do [[ ${argv[i]} == --node ]] && node=${argv[i + 1]}-$n; done
log=$logdir/svmd-$node.log
pid=
cleanup() {
	[[ -n $pid ]] && kill -9 "$pid" 2>/dev/null
	wait 2>/dev/null
	rm -f "$sock"
}
trap cleanup EXIT
trap 'exit 0' TERM HUP
"${argv[@]}" --control "unix:$sock" </dev/null >/dev/null 2>>"$log" &
pid=$!
echo "$pid" >"/run/svm-agent/d$n.pid" # node-b.sh kills what is left at the end
for ((i = 0; i < 600; ++i)); do
	[[ -S $sock ]] && break
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "failed: svmd exited during startup: $(tail -1 "$log")"
		exit 0
	fi
	sleep 0.1
done
echo "ready unix:$sock"
while read -r cmd sig; do
	case $cmd in
	kill)
		kill -"$sig" "$pid" 2>/dev/null
		wait "$pid"
		echo "exited $?"
		pid=
		;;
	esac
done
