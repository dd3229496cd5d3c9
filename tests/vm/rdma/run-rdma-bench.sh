#!/usr/bin/env bash
# The RDMA benchmarks of issue 4, in one guest boot, each beside its
# reference measured in the same boot (benchmarks, not tests: nothing here
# fails on a number). Run it under the VM lock:
#
#   flock /tmp/svm-vm.lock tests/vm/rdma/run-rdma-bench.sh \
#       --kernel stable|unstable --cache DIR --build DIR [--quick] [--log DIR]
#       [--before DIR] [--only-read] [--client]
#
# --build is the CMake build directory holding svmd, svm-exporter,
# tests/bench/svm-read-bench and tests/bench/svm-rdma-reg-bench
# (`ninja -C DIR svm-read-bench svm-rdma-reg-bench`). --quick: fewer
# iterations and smaller sizes (a few minutes instead of a quarter hour).
# --before DIR: another build (e.g. main's, before a change) whose
# svm-read-bench runs rows 1 and 2 again in the same boot, right after this
# build's, so a change is compared with what it replaced under the same
# emulation and load (its svmd is the one its bench was built against).
# --only-read: rows 1 and 2 only (and --before's).
# --client: rows 1 and 2 (and --before's row 1) also run svm-read-bench's
# client tests (cached read, prefetch of the import into the shared cache: fills
# that land in the cache file, first-touch faults of a mapping, also against
# ib_read_lat; row 2's import is on the zero-copy path, whose reads are not
# cached: no cached row there).
#
# In the guest (rxe0 on v0 = 10.77.0.1, MTU 4096; svm_shim loaded):
#   1. svm-read-bench, rdma transport, shim source, private memory (staged
#      path): read latency vs ib_read_lat and ucx_perftest get (UCT), 64 MiB in
#      1 MiB reads vs ib_read_bw (default depth and -t 1) and UCT get;
#   2. the same with a MAP_SHARED memfd export (the zero-copy path once svmd
#      has it; the printout names the path the import used);
#   3. invalidation latency, shim source, then procfs source, vs ib_send_lat;
#   4. svm-rdma-reg-bench: ODP vs pinned registration of 1 GiB, first-read and
#      steady-state READ cost (ODP rows on 7.x only).
# UCX: UCP (`ucx_perftest -t ucp_get`) does not connect on rxe here (its
# ud_verbs wire-up times out; tcp cannot be UCP's auxiliary transport), so
# the UCX reference is the UCT level, `ucx_perftest -t get -x rc_verbs`
# (the same one-sided READ through UCX's rc_verbs transport). A full run also
# makes one ucp_get attempt and prints its error, as evidence.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [[ ${1:-} == --in-guest ]]; then
	shift
	build=$1 quick=$2 before=${3:-} only_read=${4:-0} client=${5:-0}
	row1=lat,bw
	row2=lat,bw
	((client)) && row1=lat,bw,client row2=lat,bw,client
	export SVM_TEST_SLOW=1 TMPDIR=$SVM_VM_SCRATCH
	bench=$build/tests/bench
	if ((quick)); then
		lat=(--iterations 200 --sizes 4096,65536 --bw-total-mb 16)
		inval=(--inval-iterations 30)
		reg=(--reg-mb 256 --lat-pages 128 --bw-mb 32)
	else
		lat=(--iterations 1000 --sizes 4096,65536,1048576 --bw-total-mb 64)
		inval=(--inval-iterations 200)
		reg=(--reg-mb 1024 --lat-pages 256 --bw-mb 64)
	fi
	common=(--transport rdma --reference perftest --rdma-device rxe0 --rdma-gid-index 1
		--rdma-addr 10.77.0.1)
	echo "== kernel $SVM_VM_KVER ($SVM_VM_KERNEL), rxe: $SVM_VM_RXE"
	ibv_devinfo -d rxe0 -v 2>/dev/null | grep -E 'active_mtu|ODP|RC  *:' | sed 's/^/#   /' || true
	rc=0
	run() {
		echo
		echo "== $*"
		local t0=$SECONDS
		"$@" || { echo "== FAILED (exit $?): $1"; rc=1; }
		echo "== $((SECONDS - t0)) s"
	}
	ucx=(--ucx --ucx-api uct --ucx-tls rc_verbs)
	((only_read)) && ucx=()
	run "$bench/svm-read-bench" "${common[@]}" --source shim --memory private --tests "$row1" \
		"${ucx[@]}" "${lat[@]}"
	run "$bench/svm-read-bench" "${common[@]}" --source shim --memory memfd --tests "$row2" "${lat[@]}"
	if [[ -n $before ]]; then
		echo
		echo "== the same rows with the --before build ($before)"
		run "$before/tests/bench/svm-read-bench" "${common[@]}" --source shim --memory private --tests "$row1" "${lat[@]}"
		run "$before/tests/bench/svm-read-bench" "${common[@]}" --source shim --memory memfd --tests lat,bw "${lat[@]}"
	fi
	((only_read)) && exit $rc
	run "$bench/svm-read-bench" "${common[@]}" --source shim --tests inval "${inval[@]}"
	run "$bench/svm-read-bench" "${common[@]}" --source procfs --tests inval "${inval[@]}"
	run "$bench/svm-rdma-reg-bench" --device rxe0 "${reg[@]}"
	if ((!quick)); then
		echo
		echo "== ucp_get attempt: UCX_TLS=rc_verbs,ud_verbs,self UCX_NET_DEVICES=rxe0:1 ucx_perftest -t ucp_get -s 4096 -n 100"
		(UCX_TLS=rc_verbs,ud_verbs,self UCX_NET_DEVICES=rxe0:1 timeout 120 ucx_perftest -t ucp_get \
			-s 4096 -n 100 -w 10 -p 13900 >"$TMPDIR/ucp-server.out" 2>&1 &)
		sleep 3
		UCX_TLS=rc_verbs,ud_verbs,self UCX_NET_DEVICES=rxe0:1 timeout 120 ucx_perftest 10.77.0.1 \
			-t ucp_get -s 4096 -n 100 -w 10 -p 13900 2>&1 | grep -E 'Final|ERROR|Fatal' | cut -c1-160 || true
		sleep 2
	fi
	exit $rc
fi

kernel=
cache=
build=
logs=
quick=0
before=
only_read=0
client=0
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--log) logs=$2; shift 2 ;;
	--quick) quick=1; shift ;;
	--before) before=$(cd "$2" && pwd); shift 2 ;;
	--only-read) only_read=1; shift ;;
	--client) client=1; shift ;;
	*) echo "run-rdma-bench: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build ]] ||
	{ echo "run-rdma-bench: --kernel, --cache and --build are required" >&2; exit 2; }
build=$(cd "$build" && pwd)
for b in tests/bench/svm-read-bench tests/bench/svm-rdma-reg-bench; do
	[[ -x $build/$b ]] || { echo "run-rdma-bench: $build/$b missing; ninja -C $build svm-read-bench svm-rdma-reg-bench" >&2; exit 2; }
done
"$here/../install-vm-deps.sh"
if ! command -v ucx_perftest >/dev/null; then
	if [[ $(id -u) -eq 0 ]]; then
		echo "run-rdma-bench: installing ucx-utils (ucx_perftest)" >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ucx-utils >&2 ||
			echo "run-rdma-bench: ucx-utils not installed: the ucx rows will say so" >&2
	else
		echo "run-rdma-bench: ucx_perftest missing (apt-get install ucx-utils as root): the ucx rows will say so" >&2
	fi
fi
logs=${logs:-$build/vm-logs/rdma-bench-$kernel}
rm -rf "$logs"
mkdir -p "$(dirname "$logs")"
start=$(date +%s)
rc=0
# 3 GiB guest: 1 GiB pinned plus the daemons and the page cache of the 9p root.
"$here/../run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs" --timeout 3000 --mem 3072 -- \
	"$here/run-rdma-bench.sh" --in-guest "$build" "$quick" "$before" "$only_read" "$client" || rc=$?
echo "rdma_bench_$kernel: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
