#!/usr/bin/env bash
# Builds svm with a sanitizer (gcc) in its own build directory and runs CTest
# labels there; any sanitizer report fails the test it happens in (the
# process exits non-zero: halt_on_error, no recovery from UB).
#
#   run-sanitized.sh [asan|tsan] LABELS [BUILD_DIR] [CTEST_ARGS...]
#
#   asan (default): AddressSanitizer + UndefinedBehaviorSanitizer, leak checks
#   tsan: ThreadSanitizer (suppressions: tests/sanitize/tsan.supp, each with
#         its reason)
#   LABELS: CTest labels, comma-separated (unit,integration)
#   BUILD_DIR: default build-asan / build-tsan at the top of the tree
#   CTEST_ARGS: passed on (e.g. -R to run a subset)
#
# $SVM_SANITIZE_TARGETS, when set, names the ninja targets to build instead
# of everything (the subset run must then select only tests of those).
# The integration tests run with SVM_TEST_SLOW=1: the harness's waits are
# stretched x5, as for the VM tier under TCG, because instrumented daemons
# are several times slower.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
san=asan
options=()
if [[ ${1:-} == asan || ${1:-} == tsan ]]; then
	san=$1
	shift
fi
labels=${1:?labels}
build=${2:-$root/build-$san}
shift 2 || shift $#
case $san in
asan) flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" ;;
# -Wno-tsan: gcc warns that TSan does not model std::atomic_thread_fence.
# svm's fences (daemon/session/abi.h, client/session.cc) order accesses to
# memory shared between svmd and a client process, which TSan, watching one
# process, cannot see either way. -Wno-error=maybe-uninitialized: gcc 12's
# flow analysis misfires on TSan-instrumented code (a lambda capture in
# rdma_transport.cc); the plain build keeps the warning an error.
# SVM_TSAN_ABSL: tsan_absl.cc (README.md, "ThreadSanitizer and abseil").
# -U__SANITIZE_THREAD__: the headers of the uninstrumented libraries must be
# read as those libraries were built, or their types differ (protobuf's
# MapFieldBase gains two members under TSan and the program crashes in
# libprotobuf; abseil and gRPC switch on annotations of their own).
# -D_GLIBCXX_TSAN=1 keeps libstdc++'s TSan-friendly shared_ptr release, which
# that macro otherwise turns on.
tsan)
	flags="-fsanitize=thread -U__SANITIZE_THREAD__ -D_GLIBCXX_TSAN=1 -fno-omit-frame-pointer -Wno-tsan -Wno-error=maybe-uninitialized"
	options=(-DSVM_TSAN_ABSL=ON)
	;;
esac
launcher=()
if command -v ccache >/dev/null; then
	launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
mkdir -p "$build"
build=$(cd "$build" && pwd)
# After $build is made absolute: the tree links with this path.
link_flags=$flags
if [[ $san == asan ]]; then
	# ubsan_log.c: UBSan's reports to a file too (see there).
	link_flags="$flags $build/ubsan_log.o"
fi
(
	# Two runs on one tree (a user's and CTest's) build it one at a time.
	flock 9
	# -g1 (line tables: enough for the reports' stacks) and -O1: these trees
	# compile in about half the time of -O2 -g, which CI's budget needs
	# (measured on transport_seam_test.cc under ASan: 32 s against 71 s).
	# ASan + UBSan at -Og: its tree built in 397 s against 586 s at -O1 (with
	# SVM_SANITIZER_TREE's subset), and its tests ran no slower (231 s
	# against 253 s); TSan gains little from it (10%), so stays at -O1.
	# SVM_SANITIZER_TREE: the tree leaves out suites its entries never run
	# (tests/integration/CMakeLists.txt, tests/unit/CMakeLists.txt).
	opt="-O1 -g1 -DNDEBUG"
	[[ $san == asan ]] && opt="-Og -g1 -DNDEBUG"
	config=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=$opt"
		"-DCMAKE_C_FLAGS_RELWITHDEBINFO=$opt" "${launcher[@]}" -DSVM_VM_TESTS=OFF -DSVM_SANITIZE_TIER=OFF -DSVM_SANITIZER_TREE=ON
		-DSVM_FUZZ_SECONDS=0 "${options[@]}" "-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_C_FLAGS=$flags"
		"-DCMAKE_EXE_LINKER_FLAGS=$link_flags")
	configure=
	[[ -f $build/build.ninja ]] || configure=1
	# A tree configured with other options (an older script) is configured again.
	[[ $(cat "$build/.svm-configure" 2>/dev/null) == "${config[*]}" ]] || configure=1
	if [[ $san == asan && $here/ubsan_log.c -nt $build/ubsan_log.o ]]; then
		cc -O2 -Wall -Wextra -Werror -c "$here/ubsan_log.c" -o "$build/ubsan_log.o"
		configure=1 # a tree configured before it existed links it from now on
	fi
	if [[ -n $configure ]]; then
		cmake -S "$root" -B "$build" -G Ninja "${config[@]}" \
			>"$build/configure.log" 2>&1 || { cat "$build/configure.log" >&2; exit 1; }
		echo "${config[*]}" >"$build/.svm-configure"
	fi
	# shellcheck disable=SC2086 # a list of targets
	ninja -C "$build" -j "${SVM_JOBS:-2}" ${SVM_SANITIZE_TARGETS:-} >"$build/build.log" 2>&1 ||
		{ tail -50 "$build/build.log" >&2; exit 1; }
) 9>"$build/.lock"
# SVM_SANITIZE_BUILD_ONLY=1: the tree is built, no test runs (the CTest
# entry sanitize.asan_ubsan.build, beside the VM tier).
if [[ ${SVM_SANITIZE_BUILD_ONLY:-0} == 1 ]]; then
	echo "run-sanitized: $san tree built in $build"
	exit 0
fi
# Every sanitizer writes its reports to $reports/NAME.PID (log_path) instead
# of stderr, and the run fails when any such file exists afterwards, whatever
# the tests said: the integration tests SIGKILL their daemons and do not look
# at how they exited, so a report inside svmd (which halts it) would be lost
# otherwise. The files are printed at the end. ASan's LeakSanitizer writes to
# ASan's file; a SIGKILLed process runs no leak check. lsan.supp: leaks in
# Debian's libraries, each with its reason.
reports=$build/$san-reports
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0:log_path=$reports/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan}
export SVM_UBSAN_LOG_PATH=$reports/ubsan
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$here/lsan.supp}
# ignore_noninstrumented_modules: the memory accesses TSan's interceptors
# (memcpy, memmove, memset, ...) make on behalf of a library built without
# TSan (Debian's gRPC, protobuf, abseil) are not checked, as that library's
# own loads and stores are not: such a library's data is guarded by its own
# atomics and spinlocks, which TSan cannot see (seen: every svmd reported
# memmove inside abseil's deadlock graph, GraphCycles::InsertEdge, which an
# abseil-internal spinlock guards). Synchronisation those interceptors do
# (pthread_*) still counts, and svm's own calls are checked as before.
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1:suppressions=$here/tsan.supp:log_path=$reports/tsan}
export SVM_TEST_SLOW=${SVM_TEST_SLOW:-1}
cd "$build"
rm -rf "$reports"
mkdir -p "$reports"
rc=0
# On a terminal the tests' output streams; otherwise (CTest's sanitize.*
# entries, CI) it is kept in $log and printed after a digest of what
# failed: the failing tests' assertion messages and the first lines of each
# sanitizer report come first, so a log that is cut in the middle (CI
# shows the head and the tail of a long output) still says why.
log=$build/ctest.log
args=(-L "^(${labels//,/|})\$" -j "${SVM_TEST_JOBS:-2}" --output-on-failure --timeout 600 "$@")
if [[ -t 1 ]]; then
	ctest "${args[@]}" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
else
	ctest "${args[@]}" >"$log" 2>&1 || rc=$?
fi
shopt -s nullglob
found=("$reports"/*)
if [[ ! -t 1 ]]; then
	if ((rc != 0 || ${#found[@]})); then
		echo "=== $san digest: failing tests (ctest exit $rc), then sanitizer reports; the whole output follows"
		# CTest's closing list: "  433 - integration.X (Failed)".
		sed -n '/^The following tests FAILED:/,$p' "$log" | grep -E '^\s+[0-9]+ - ' || true
		# gtest's assertion messages (FILE:LINE: Failure and what follows).
		grep -E -A6 ': Failure$' "$log" | head -80 || true
		for f in "${found[@]}"; do
			echo "--- $f"
			grep -E -m8 -A12 '^(WARNING|ERROR): [A-Za-z]+Sanitizer|runtime error' "$f" | head -40 || true
		done
		echo "=== end of digest"
	fi
	cat "$log"
fi
if ((${#found[@]})); then
	echo "Sanitizer reports (${#found[@]} processes, $reports):" >&2
	for f in "${found[@]}"; do
		echo "=== $f" >&2
		cat "$f" >&2
	done
	exit 1
fi
exit "$rc"
