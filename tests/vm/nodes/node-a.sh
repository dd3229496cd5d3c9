#!/bin/bash
# Node A of the two-guest run (run-two-guests.sh), in its guest: waits for
# node B's agent, then runs the test binaries with one daemon here (node
# "A...", the exporter's) and the others on node B (harness.h,
# SVM_TEST_REMOTE), once per transport, then again with netem loss and delay
# on this guest's NIC when --netem is given. Writes SHARED/a-done at the end.
#   node-a.sh SHARED_DIR --transports "tcp rdma" [--netem "loss 1% delay 20ms 5ms"]
#             [--netem-tests REGEX] [--expect-odp] [--bench SVM_READ_BENCH] -- TEST_BINARY[:GTEST_FILTER]...
here=$(cd "$(dirname "$0")" && pwd)
shared=$1
shift
transports="tcp rdma"
netems=()
netem_tests=.
expect_odp=
bench=
while (($#)); do
	case "$1" in
	--transports) transports=$2; shift 2 ;;
	--netem) netems+=("$2"); shift 2 ;; # may be repeated: one phase each
	--netem-tests) netem_tests=$2; shift 2 ;;
	--expect-odp) expect_odp=1; shift ;;
	--bench) bench=$2; shift 2 ;; # svm-read-bench: the cross-guest benchmarks (bench-a.sh)
	--) shift; break ;;
	*) echo "node-a: unknown argument $1" >&2; exit 2 ;;
	esac
done
trap 'touch "$shared/a-done"' EXIT
ln -sf /proc/self/fd /dev/fd 2>/dev/null
echo "node A: kernel $SVM_VM_KVER, rxe: $SVM_VM_RXE"
[[ $SVM_VM_RXE == "rxe0 up"* ]] || { echo "node A: no wire"; exit 1; }
for ((i = 0; i < 600; ++i)); do
	[[ -e $shared/b-ready || -e $shared/b-failed ]] && break
	sleep 1
done
[[ -e $shared/b-ready ]] || { echo "node A: node B not ready: $(cat "$shared/b-failed" 2>/dev/null)"; exit 1; }
b=$(cat "$shared/b-ready")
# Static neighbours (see node-b.sh); run-vm.sh derives the MAC from the address.
ip neigh replace "$b" lladdr "$(printf '52:54:00:00:%02x:%02x' "$(cut -d. -f3 <<<"$b")" "$(cut -d. -f4 <<<"$b")")" \
	dev "$SVM_VM_NET_DEV" nud permanent
busybox ping -c 3 -W 5 "$b" || { echo "node A: node B ($b) does not answer ping"; exit 1; }

export SVM_TEST_SOURCE=shim SVM_TEST_SLOW=1 TMPDIR=$SVM_VM_SCRATCH
# huge_pages_test: 2 MiB hugetlb pages for its memfd, required here.
echo 16 >/proc/sys/vm/nr_hugepages
export SVM_EXPECT_HUGE=1
export SVM_TEST_REMOTE=$b:7000 SVM_TEST_HOST=$SVM_VM_NET_ADDR SVM_TEST_WIRE_DEV=$SVM_VM_NET_DEV
rc=0
# Every non-zero rxe0 hardware counter (retransmissions, retries exhausted,
# sequence errors, duplicates, ...), name=value.
rxe_counters() {
	local f v
	for f in /sys/class/infiniband/rxe0/ports/1/hw_counters/*; do
		v=$(cat "$f" 2>/dev/null) && [[ $v != 0 ]] && printf '%s=%s ' "${f##*/}" "$v"
	done
}
counters() {
	echo "node A: $SVM_VM_NET_DEV tx_bytes $(cat "/sys/class/net/$SVM_VM_NET_DEV/statistics/tx_bytes")" \
		"rx_bytes $(cat "/sys/class/net/$SVM_VM_NET_DEV/statistics/rx_bytes");" \
		"rxe0 (non-zero): $(rxe_counters)"
}
run_suite() { # PHASE [REGEX of binaries]
	local phase=$1 only=${2:-.} t bin filter transport
	for transport in $transports; do
		export SVM_TEST_TRANSPORT=$transport
		if [[ $transport == rdma ]]; then
			export SVM_EXPECT_RDMA=1 SVM_EXPECT_ODP=${expect_odp:-0}
		else
			unset SVM_EXPECT_RDMA SVM_EXPECT_ODP
		fi
		for t in "${tests[@]}"; do
			bin=${t%%:*}
			filter=
			[[ $t == *:* ]] && filter=${t#*:}
			[[ $(basename "$bin") =~ $only ]] || continue
			counters
			echo "== $phase: $(basename "$bin") (transport $transport, node B $b, kernel $SVM_VM_KVER)"
			"$bin" --gtest_brief=1 ${filter:+"--gtest_filter=$filter"} || rc=1
		done
	done
	counters
}
tests=("$@")
run_suite "wire"
# The wire check must be able to fail: with node B's daemon on this guest
# too (SVM_TEST_REMOTE unset), the bytes never leave through the NIC.
for t in "${tests[@]}"; do
	[[ $(basename "${t%%:*}") == two_guests_test ]] || continue
	echo "== self-check: both daemons on node A; two_guests_test must fail"
	if env -u SVM_TEST_REMOTE SVM_TEST_TRANSPORT=tcp "${t%%:*}" --gtest_brief=1 --gtest_filter='Tcp/*'; then
		echo "node A: self-check FAILED: the wire check passed without the wire"
		rc=1
	else
		echo "node A: self-check ok: the wire check fails when node B is local"
	fi
done
# A command on node B through its agent (node-agent.sh "run"): prints its
# output, returns its status.
on_b() {
	local answer
	answer=$({ printf run; printf '\t%s' "$@"; printf '\n'; } | socat -t 120 - "TCP:$b:7000")
	read -r _ status out err <<<"$answer"
	base64 -d <<<"$out"
	base64 -d <<<"$err" >&2
	return "${status:-1}"
}
# netem on both ends of the wire: node A's egress (the data node B reads)
# and node B's (its requests and acknowledgements).
for netem in "${netems[@]}"; do
	modprobe -d "$SVM_VM_MODROOT" sch_netem || { echo "node A: no sch_netem"; exit 1; }
	# shellcheck disable=SC2086
	tc qdisc add dev "$SVM_VM_NET_DEV" root netem $netem || exit 1
	# shellcheck disable=SC2016
	on_b bash -c 'modprobe -d "$SVM_VM_MODROOT" sch_netem && tc qdisc add dev "$SVM_VM_NET_DEV" root netem '"$netem" ||
		{ echo "node A: netem on node B failed"; exit 1; }
	tc qdisc show dev "$SVM_VM_NET_DEV"
	busybox ping -c 5 "$b" | tail -2
	run_suite "netem $netem" "$netem_tests"
	tc -s qdisc show dev "$SVM_VM_NET_DEV"
	tc qdisc del dev "$SVM_VM_NET_DEV" root
	# shellcheck disable=SC2016
	on_b bash -c 'tc -s qdisc show dev "$SVM_VM_NET_DEV" | sed "s/^/node B: /"; tc qdisc del dev "$SVM_VM_NET_DEV" root'
done
if [[ -n $bench ]]; then
	"$here/bench-a.sh" "$b" "$transports" "$bench" || rc=1
fi
exit $rc
