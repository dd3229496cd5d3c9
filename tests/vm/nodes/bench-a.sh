#!/bin/bash
# Benchmarks across the two guests (run-two-guests.sh --bench, on node A
# after the tests): perftest between the guests, then svm-read-bench with
# one daemon per guest, and the ratios. The data moves from node B to node
# A in both: ib_read_lat / ib_read_bw's client on node A reads the memory of
# its server on node B (started through node B's agent), and svm-read-bench
# on node A reads, through its daemon here, an export of svm-exporter on
# node B (its daemon "bench-a" runs there: SVM_TEST_REMOTE_NODES, harness.h).
# Emulated (TCG) numbers: only the ratios, taken in the same boot, mean
# something.
#   bench-a.sh NODE_B_ADDR TRANSPORTS SVM_READ_BENCH
b=$1
transports=$2
bench=$3
[[ -x $bench ]] || { echo "bench: no svm-read-bench at $bench"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo 18600 >"$tmp/port" # perf runs in $(...): the next port is kept in a file
rc=0
# TOOL SIZE ITERS: the client's result row (server on node B, client here),
# retried while the server is not up yet or TCG makes perftest print "inf".
perf() {
	local tool=$1 size=$2 n=$3 try i out
	for ((try = 0; try < 3; ++try)); do
		local port=$(($(cat "$tmp/port") + 1))
		echo "$port" >"$tmp/port"
		local args=(-d rxe0 -x 1 -s "$size" -n "$n" -p "$port" -F)
		{ printf exec; printf '\t%s' "$tool" "${args[@]}"; printf '\n'; } |
			timeout 300 socat -t 300 - "TCP:$b:7000" >"$tmp/server" 2>&1 &
		local server=$!
		for ((i = 0; i < 30; ++i)); do
			sleep 1
			"$tool" "${args[@]}" "$b" >"$tmp/client" 2>&1 && break
		done
		wait "$server"
		out=$(awk -v s="$size" '$1 == s' "$tmp/client" | tail -1)
		if [[ -n $out && $out != *inf* ]]; then
			echo "$out"
			echo "# $tool ${args[*]} $b" >&2
			return 0
		fi
	done
	echo "bench: $tool -s $size gave no result:" >&2
	cat "$tmp/client" >&2
	return 1
}
echo "== bench: perftest between the guests (client node A, server node B)"
lat=$(perf ib_read_lat 4096 1000) && lat_us=$(awk '{print $5}' <<<"$lat") || rc=1
bw=$(perf ib_read_bw 1048576 64) && bw_mb=$(awk '{print $4}' <<<"$bw") || rc=1
echo "ib_read_lat -s 4096: t_typical ${lat_us:-?} usec; ib_read_bw -s 1048576: BW average ${bw_mb:-?} MB/s"
for t in $transports; do
	echo "== bench: svm-read-bench --transport $t (importer node A, exporter node B)"
	SVM_TEST_REMOTE=$b:7000 SVM_TEST_REMOTE_NODES=bench-a \
		"$bench" --transport "$t" --source shim --sizes 4096 --iterations 300 \
		--bw-total-mb 64 --bw-request-kb 1024 --tests lat,bw --json >"$tmp/svm.$t" 2>"$tmp/svm.$t.err" ||
		{ echo "bench: svm-read-bench ($t) failed:"; cat "$tmp/svm.$t.err"; rc=1; continue; }
	python3 - "$tmp/svm.$t" "$t" "${lat_us:-0}" "${bw_mb:-0}" <<'EOF' || rc=1
import json, sys
rows = json.load(open(sys.argv[1]))
t, lat, bw = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
fresh = next(r for r in rows if r["test"] == "lat" and r["mode"] == "fresh")
cached = next(r for r in rows if r["test"] == "lat" and r["mode"] == "cached")
bulk = next(r for r in rows if r["test"] == "bw")
ratio = lambda a, b: "%.2f" % (a / b) if b > 0 else "-"
print("%-6s 4 KiB fresh read: %8.1f usec typical (p99 %.1f), ib_read_lat %8.1f usec, ratio %s" %
      (t, fresh["t_typical_usec"], fresh["t_p99_usec"], lat, ratio(fresh["t_typical_usec"], lat)))
print("%-6s 4 KiB cached read: %7.1f usec typical" % (t, cached["t_typical_usec"]))
print("%-6s 64 MiB bulk (1 MiB fresh reads): %8.1f MB/s, ib_read_bw %8.1f MB/s, ratio %s" %
      (t, bulk["bw_avg_mb_s"], bw, ratio(bulk["bw_avg_mb_s"], bw)))
EOF
done
exit $rc
