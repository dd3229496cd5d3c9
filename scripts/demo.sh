#!/usr/bin/env bash
# The svm demo: two nodes on this machine (two svmd on 127.0.0.1, TCP
# transport, procfs mirror source). Node A exports memory of a process,
# node B imports and reads it; the process changes its mapping and writes,
# B is invalidated and reads the new content. Exits 0 when every step saw
# what it should.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SVM_BUILD_DIR:-$root/build}
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" >/dev/null

svmd=$build/daemon/svmd
svmctl=$build/client/svmctl
exporter=$build/client/svm-exporter
work=$(mktemp -d /tmp/svm-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
fail() { printf 'demo FAILED: %s\n' "$*" >&2; for f in "$work"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }
ctl_a() { timeout 20 "$svmctl" --daemon "unix:$work/a.sock" "$@"; }
ctl_b() { timeout 20 "$svmctl" --daemon "unix:$work/b.sock" "$@"; }
first_bytes() { ctl_b read --name demo --offset $(($1 * 4096)) --len 8 | od -An -c | tr -d ' \n'; }

wait_socket() {
  for _ in $(seq 200); do
    if [[ -S $1 ]] && timeout 2 "$svmctl" --daemon "unix:$1" status >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  fail "svmd did not come up on $1"
}

say "== svm demo: two nodes on 127.0.0.1 (tcp transport, procfs source)"
"$svmd" --control "unix:$work/a.sock" --peer-listen 127.0.0.1:0 --node node-a 2>"$work/a.log" & pids+=($!)
"$svmd" --control "unix:$work/b.sock" --peer-listen 127.0.0.1:0 --node node-b 2>"$work/b.log" & pids+=($!)
wait_socket "$work/a.sock"
wait_socket "$work/b.sock"
peer_a=$(ctl_a status --json | sed -n 's/.*"peer_listen": "\(.*\)".*/\1/p')
say "node-a and node-b are up; node-a serves peers on $peer_a"

# The exporting process: 16 pages of 'A', scriptable on its stdin.
coproc EXP { exec timeout 300 "$exporter" --daemon "unix:$work/a.sock" --name demo --pages 16 --fill 65 2>"$work/exporter.log"; }
pids+=($EXP_PID)
exp() { echo "$1" >&"${EXP[1]}"; local reply; read -r -t 20 reply <&"${EXP[0]}" || fail "exporter did not answer '$1'"; [[ $reply == ok* ]] || fail "exporter: $reply"; }
read -r -t 20 ready <&"${EXP[0]}" || fail "exporter did not start"
say "a process on node-a ($ready) exported 16 pages as 'demo'"

ctl_b import --peer "$peer_a" --name demo >/dev/null || fail "import"
got=$(first_bytes 0)
say "node-b imported 'demo' and reads page 0: $got"
[[ $got == AAAAAAAA ]] || fail "page 0 should read AAAAAAAA, read $got"

# A watch on node-b narrates every invalidation that arrives.
ctl_b watch --name demo --verbose >"$work/watch.out" 2>"$work/watch.err" & pids+=($!)
for _ in $(seq 200); do grep -q watching "$work/watch.err" 2>/dev/null && break; sleep 0.05; done
events() { wc -l <"$work/watch.out"; }
wait_event() {  # wait_event COUNT PAGE
  for _ in $(seq 200); do
    if (($(events) >= $1)); then
      local line; line=$(sed -n "${1}p" "$work/watch.out")
      say "   node-b was invalidated: $line"
      return 0
    fi
    sleep 0.05
  done
  fail "no invalidation for page $2 reached node-b"
}

ctl_b read --name demo --offset 0 --len 65536 >/dev/null  # node-b now caches all 16 pages

say "-- the process munmaps page 1 and maps new content ('B') at the same address"
exp "remap 1 1 66"
wait_event 1 1
if sed -n 1p "$work/watch.out" | grep -q ' write$'; then
  say "   (the new page reused the old page frame: procfs saw new content, not a new frame; the shim source sees the munmap itself)"
fi
got=$(first_bytes 1)
say "   node-b re-reads page 1: $got"
[[ $got == BBBBBBBB ]] || fail "page 1 should read BBBBBBBB, read $got"

say "-- the process drops page 2 with madvise(MADV_DONTNEED)"
exp "dontneed 2 1"
wait_event 2 2
got=$(first_bytes 2)
say "   node-b re-reads page 2: $got"
[[ $got == '\0\0\0\0\0\0\0\0' ]] || fail "page 2 should read zeros, read $got"

say "-- the process stores 'C' into page 3 and calls Sync (stores fire no notifier; Sync publishes them)"
before=$(events)
exp "fill 3 1 67"
exp "sync"
for _ in $(seq 100); do (($(events) > before)) && break; sleep 0.02; done
(($(events) > before)) || fail "Sync returned but node-b saw no invalidation"
say "   node-b was invalidated: $(tail -n 1 "$work/watch.out")"
got=$(first_bytes 3)
say "   node-b re-reads page 3: $got"
[[ $got == CCCCCCCC ]] || fail "page 3 should read CCCCCCCC, read $got"
got=$(first_bytes 4)
[[ $got == AAAAAAAA ]] || fail "page 4 should still read AAAAAAAA, read $got"
say "   untouched page 4 still reads $got"

say "-- what the operator sees"
ctl_a exports
ctl_b imports

say "-- the exporting process exits"
echo exit >&"${EXP[1]}"
for _ in $(seq 100); do grep -q " exit$" "$work/watch.out" && break; sleep 0.05; done
grep -q " exit$" "$work/watch.out" || fail "node-b was not told the process exited"
say "   node-b was invalidated: $(grep ' exit$' "$work/watch.out" | head -n 1)"
if err=$(ctl_b read --name demo --offset 0 --len 8 2>&1 >/dev/null); then fail "read after exit succeeded"; fi
say "   node-b reads again: $err"
say "== demo OK"
