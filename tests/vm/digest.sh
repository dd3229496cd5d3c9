# Sourced by the VM tier's suites (vm-daemon-suite.sh, vm-dax-suite.sh,
# vm-shim-suite.sh): run_digested LOG COMMAND... runs COMMAND and returns its
# exit status.
#
# On a terminal COMMAND's output streams (and is kept in LOG). Otherwise
# (CTest, CI) it goes to LOG and is printed when COMMAND ends, after a digest
# when it failed: the gtest tests that failed, their assertion messages, the
# shim tests' failures, the harness's own errors (a guest that timed out or
# did not report, an oops in its dmesg). An entry's output runs to
# thousands of lines (the daemons' logs) and CI shows only its head and its
# tail, so the reason a suite failed comes first.
run_digested() {
	local log=$1 rc=0
	shift
	mkdir -p "$(dirname "$log")"
	if [[ -t 1 ]]; then
		"$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
		return "$rc"
	fi
	"$@" >"$log" 2>&1 || rc=$?
	if ((rc != 0)); then
		vm_digest "$log" "$rc"
	fi
	cat "$log"
	return "$rc"
}

# vm_digest LOG RC: the digest alone (also for a log written elsewhere).
vm_digest() {
	local rc=$2 log
	log=$(mktemp)
	# The guest's serial console ends lines with CR LF, and gtest colours
	# its verdicts there (a terminal).
	sed -e 's/\r$//' -e 's/\x1b\[[0-9;]*m//g' "$1" >"$log"
	echo "=== digest (exit $rc): what failed, then the whole output"
	# gtest: the failed tests ("[  FAILED  ] Suite.Test, where ... (N ms)";
	# a summary without --gtest_brief repeats them) and each assertion with
	# what follows.
	grep -E '^\[  FAILED  \] [A-Za-z]' "$log" | sed -E 's/ \([0-9]+ ms\)$//' | sort -u | head -40 || true
	grep -E -A8 ': Failure$' "$log" | head -120 || true
	# The guest suites' own verdicts and the harness's errors.
	# TAP (the shim tests) and their "# file:line:" diagnostics, dax-guest's
	# FAIL lines, each gtest binary's time, run-vm's FAIL and FATAL lines
	# (a guest that timed out, did not report, or whose dmesg holds an oops).
	grep -E '^not ok |^# [^ ]+:[0-9]+: |^# .*killed by signal|== \[[a-z]+\] (FAIL|tests rc)|^== [a-z_]+: [0-9]+ s$|run-vm\[[a-z]+\]: (FAIL|FATAL)' "$log" | head -60 || true
	grep -E -A12 'run-vm\[[a-z]+\]: FAIL: kernel problems' "$log" | head -14 || true
	echo "=== end of digest"
	rm -f "$log"
}
