#!/usr/bin/env bash
# One CTest entry of the VM tier: boot one kernel with svm_shim loaded and
# run the daemon's integration suite in it with the shim mirror source
# (SVM_TEST_SOURCE=shim: the daemons run with --source shim, and the suite
# checks `svmctl status` names it, so a silent fallback to procfs fails).
#
# With --transport rdma the daemons run the rdma data path on the guest's
# rxe0 (SVM_TEST_TRANSPORT=rdma: the suite checks `svmctl status` names it,
# so a silent fallback to tcp fails too). Without it they run tcp. The suites
# are parameterized over the transport; SVM_TEST_TRANSPORT selects the one
# instance each entry covers (the others skip), so no test runs twice.
#
# --expect-odp sets SVM_EXPECT_ODP=1: tests that check the registration
# require ODP instead of deriving it from the device's capabilities; with
# --transport rdma and without it, SVM_EXPECT_ODP=0 (zero_copy_test then
# requires pinned).
#
# A TEST_BINARY may carry a gtest filter after an @ (BINARY@FILTER): the
# network-fault tests run only their tc netem cases here, which skip on a
# host kernel without sch_netem. The guest cannot autoload modules (its
# modprobe looks in the host root), so the suite loads the ones the
# netns fabric needs (veth, bridge, sch_netem, nf_tables) from the kernel's
# own tree first. It reserves 64 hugetlb pages (huge_pages_test's memfd).
# Each binary's gtest XML (every test's time) lands in LOGS/xml.
#
#   vm-daemon-suite.sh --kernel stable|unstable --cache DIR --build DIR [--transport tcp|rdma] [--expect-odp] -- TEST_BINARY[@FILTER]...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=digest.sh
source "$here/digest.sh"
kernel=
cache=
build=
transport=
expect_odp=
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--transport) transport=$2; shift 2 ;;
	--expect-odp) expect_odp=1; shift ;;
	--) shift; break ;;
	*) echo "vm-daemon-suite: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build && $# -gt 0 ]] ||
	{ echo "vm-daemon-suite: --kernel, --cache, --build and test binaries are required" >&2; exit 2; }
"$here/install-vm-deps.sh"
mkdir -p "$build"
build=$(cd "$build" && pwd)
name=vm_daemon_${transport:+${transport}_}$kernel
logs=$build/vm-logs/daemon-${transport:+$transport-}$kernel
rm -rf "$logs"
start=$(date +%s)
rc=0
# Unix sockets live on the guest's tmpfs, not on the 9p-shared host /tmp;
# SVM_TEST_SLOW stretches the suite's waits (and the daemons' peer and
# fetch deadlines) for TCG emulation.
run_digested "$logs/output.log" "$here/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs" --timeout 900 --smp 1 -- \
	env SVM_VM_XML="$logs/xml" SVM_TEST_TRANSPORT="${transport:-tcp}" SVM_EXPECT_ODP="${expect_odp:-${transport:+0}}" bash -c 'export SVM_TEST_SOURCE=shim SVM_TEST_SLOW=1 TMPDIR=$SVM_VM_SCRATCH; rc=0
		if [[ $SVM_TEST_TRANSPORT == rdma ]]; then export SVM_EXPECT_RDMA=1; fi
		echo 64 >/proc/sys/vm/nr_hugepages # 128 MiB of 2 MiB pages for huge_pages_test
		for m in veth bridge sch_netem nf_tables; do modprobe -q -d "$SVM_VM_MODROOT" "$m" || echo "vm-daemon: cannot load $m"; done
		mkdir -p "$SVM_VM_XML"
		for t in "$@"; do
			filter=
			if [[ $t == *@* ]]; then filter=${t#*@}; t=${t%%@*}; fi
			echo "== $t${filter:+ ($filter)} (source shim, transport $SVM_TEST_TRANSPORT, kernel $SVM_VM_KVER, rxe: $SVM_VM_RXE)"
			s=$(date +%s)
			"$t" --gtest_brief=1 --gtest_output="xml:$SVM_VM_XML/$(basename "$t").xml" ${filter:+--gtest_filter="$filter"} || rc=1
			echo "== $(basename "$t"): $(($(date +%s) - s)) s"
		done
		exit $rc' vm-daemon "$@" || rc=$?
echo "$name: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
