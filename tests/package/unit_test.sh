#!/usr/bin/env bash
# The rendered svmd.service (build/deploy/svmd.service): the service
# protocol it promises (docs/operations.md, "Run") and its hardening,
# rated by systemd itself: `systemd-analyze security --offline=yes` must
# stay at or below 4.0 ("OK"). Fast and hermetic: label integration.
# usage: unit_test.sh UNIT [MAX_EXPOSURE_TENTHS]
set -euo pipefail
unit=$1
max=${2:-40}
fail() { echo "unit_test: $*" >&2; exit 1; }

# The lines operators and the daemon rely on, exactly.
for line in 'Type=notify' 'WatchdogSec=30s' 'ExecReload=/bin/kill -HUP $MAINPID' \
            'LimitMEMLOCK=infinity' 'Wants=network-online.target rdma-hw.target' \
            'After=network-online.target systemd-modules-load.service rdma-hw.target' \
            'CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_IPC_LOCK CAP_CHOWN' \
            'RestartPreventExitStatus=2'; do
  grep -qxF -- "$line" "$unit" || fail "missing: $line"
done
# Capabilities, not inspection (DESIGN.md section 6): clients hand svmd
# range fds, so the unit grants neither of these.
if grep -E '^(CapabilityBoundingSet|AmbientCapabilities)=.*(CAP_SYS_PTRACE|CAP_SYS_ADMIN)' "$unit"; then
  fail "the unit grants CAP_SYS_PTRACE or CAP_SYS_ADMIN"
fi
# Every capability the unit keeps is explained in docs/operations.md.
doc=$(dirname "$0")/../../docs/operations.md
for cap in $(sed -n 's/^CapabilityBoundingSet=//p' "$unit"); do
  grep -q -- "^| \`$cap\` |" "$doc" || fail "$cap is not explained in docs/operations.md (Hardening)"
done

out=$(systemd-analyze security --offline=yes --threshold="$max" "$unit" 2>&1) || {
  echo "$out" | grep -v '^✓' >&2
  fail "exposure above $((max / 10)).$((max % 10))"
}
echo "$out" | tail -n 1
