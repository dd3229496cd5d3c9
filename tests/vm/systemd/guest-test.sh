#!/bin/bash
# Runs in the systemd VM test's guest (systemd is PID 1), started by the
# image's svm-vm-test.service once multi-user.target is reached. $1 is the
# host's run directory (9p); its file "phase" says which boot this is.
# Writes guest-PHASE.log (every check, "ok" or "FAIL"), journal-PHASE.txt,
# dmesg-PHASE and, last, rc-PHASE (the number of failed checks, capped).
share=$1
phase=$(cat "$share/phase")
exec >"$share/guest-$phase.log" 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
kver=$(uname -r)
failed=0
ok() { echo "ok - $*"; }
bad() { echo "FAIL - $*"; failed=$((failed + 1)); }
check() {  # check DESCRIPTION COMMAND...: ok when COMMAND succeeds
	local what=$1
	shift
	if "$@"; then ok "$what"; else bad "$what"; fi
}
finish() {
	journalctl -b --no-pager -o short-monotonic >"$share/journal-$phase.txt" 2>&1
	dmesg >"$share/dmesg-$phase" 2>&1
	echo "# $phase: $failed failed"
	echo $((failed > 100 ? 100 : failed)) >"$share/rc-$phase"
	sync
	exit 0
}
not_in() { ! grep -q "$1" <<<"$2"; }  # not_in PATTERN TEXT
prop() { systemctl show -p "$1" --value "${2:-svmd}"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
	local deadline=$((SECONDS + $1))
	shift
	until "$@"; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}
echo "# boot $phase: kernel $kver, PID 1 is $(readlink /proc/1/exe)"
check "systemd is PID 1" test "$(readlink /proc/1/exe)" = /usr/lib/systemd/systemd

if [[ $phase == install ]]; then
	check "the headers of $kver are installed (/lib/modules/$kver/build)" test -d "/lib/modules/$kver/build/"
	start=$SECONDS
	if dpkg -i "$share"/debs/svm-dkms_*.deb "$share"/debs/svm_*.deb >/tmp/dpkg.log 2>&1; then
		ok "dpkg -i svm-dkms svm ($((SECONDS - start)) s)"
	else
		bad "dpkg -i svm-dkms svm"
	fi
	sed 's/^/  dpkg: /' /tmp/dpkg.log
	st=$(dkms status -m svm_shim -k "$kver" 2>&1)
	echo "  dkms status: $st"
	check "DKMS built and installed svm_shim for $kver" grep -q ': installed' <<<"$st"
	ko=$(modinfo -k "$kver" -F filename svm_shim 2>/dev/null)
	echo "  module: $ko"
	check "the module is DKMS's, in /lib/modules/$kver/updates/dkms" \
		test "$ko" = "/lib/modules/$kver/updates/dkms/svm_shim.ko"
	check "its vermagic names $kver" grep -q "^$kver " <<<"$(modinfo -k "$kver" -F vermagic svm_shim 2>/dev/null)"
	ver=$(dpkg-query -W -f='${Version}' svm)
	check "one version everywhere: package $ver, $(svmd --version), $(svmctl --version), DKMS svm_shim/$ver" \
		test "$(svmd --version)|$(svmctl --version)|$(dpkg-query -W -f='${Version}' svm-dkms)" = "svmd $ver|svmctl $ver|$ver" -a \
		-n "$(grep "^svm_shim/$ver, $kver" <<<"$st")"
	check "the postinst created group svm" getent group svm
	check "the postinst enabled svmd.service" test "$(systemctl is-enabled svmd)" = enabled
	check "the postinst started svmd.service (active)" test "$(systemctl is-active svmd)" = active
	finish
fi

# ---- boot 2: the installed system as it boots -----------------------------
svmctl() { timeout 60 /usr/bin/svmctl "$@"; }
svc() { svmctl --daemon unix:/run/svm/svmd.sock "$@"; }
peer() { svmctl --daemon unix:/run/svm-peer/b.sock "$@"; }
bytes() {  # bytes CTL NAME PAGE: the first 8 bytes of a page
	"$1" read --name "$2" --offset $(($3 * 4096)) --len 8 2>&1 | od -An -c | tr -d ' \n'
}
reads() {  # reads CTL NAME PAGE EXPECTED: poll until the page reads as expected
	wait_for 20 eval '[[ $(bytes '"$1 $2 $3"') == '"$4"' ]]'
}

check "svm_shim was loaded at boot" grep -q '^svm_shim ' /proc/modules
# By identifier: the line often reaches journald after the unit finished,
# too late to be attributed to systemd-modules-load.service.
check "by systemd-modules-load (modules-load.d/svm.conf)" \
	grep -q "Inserted module 'svm_shim'" <<<"$(journalctl -b -t systemd-modules-load --no-pager -o cat)"
check "/dev/svm_shim is a character device" test -c /dev/svm_shim
mode=$(stat -c '%U:%G %a' /dev/svm_shim 2>&1)
check "/dev/svm_shim is root:svm 660 (99-svm-shim.rules; is $mode)" test "$mode" = "root:svm 660"
udev_test=$(udevadm test "$(udevadm info -q path -n /dev/svm_shim)" 2>&1)
check "udev applies 99-svm-shim.rules to it (udevadm test)" \
	grep -qE '99-svm-shim\.rules:[0-9]+ (MODE|OWNER|GROUP)' <<<"$udev_test"
grep '99-svm-shim' <<<"$udev_test" | sed 's/^/  udev: /'

check "svmd.service started at boot" test "$(systemctl is-active svmd)" = active
check "svmd.service is Type=notify" test "$(prop Type)" = notify
check "svmd uses the shim source" grep -q '^source: *shim' <<<"$(svc status)"
svc status | sed 's/^/  status: /'

# systemctl start of a Type=notify unit returns once svmd sent READY=1.
systemctl stop svmd
start=$SECONDS
check "systemctl start svmd" systemctl start svmd
check "svmd.service is active after start ($((SECONDS - start)) s)" test "$(systemctl is-active svmd)" = active
check "READY=1 was received (the start job finished and a STATUS= line is shown: '$(prop StatusText)')" \
	test -n "$(prop StatusText)"
check "journal: svmd reported ready" grep -q ' ready: ' <<<"$(journalctl -b -u svmd --no-pager -o cat)"

# A second node: svmd on port 7471 in this guest, outside the service.
mkdir -p /run/svm-peer
/usr/sbin/svmd --control unix:/run/svm-peer/b.sock --peer-listen 127.0.0.1:7471 --node peer-b \
	>/run/svm-peer/b.log 2>&1 &
peer_pid=$!
check "the peer svmd is up" wait_for 60 peer status
exp=/usr/libexec/svm/svm-exporter
coproc EA { exec "$exp" --daemon unix:/run/svm/svmd.sock --name from-service --pages 16 --fill 65 2>/run/svm-peer/ea.log; }
read -r -t 60 ready_a <&"${EA[0]}"
check "a process exports 16 pages through the service ($ready_a)" grep -q '^ready' <<<"$ready_a"
coproc EB { exec "$exp" --daemon unix:/run/svm-peer/b.sock --name from-peer --pages 8 --fill 66 2>/run/svm-peer/eb.log; }
read -r -t 60 ready_b <&"${EB[0]}"
check "a process exports 8 pages through the peer ($ready_b)" grep -q '^ready' <<<"$ready_b"
cmd() {  # cmd A|B LINE: a command to an exporter, its "ok" reply
	local reply
	if [[ $1 == A ]]; then echo "$2" >&"${EA[1]}"; read -r -t 30 reply <&"${EA[0]}"
	else echo "$2" >&"${EB[1]}"; read -r -t 30 reply <&"${EB[0]}"; fi
	[[ $reply == ok* ]]
}
check "the peer imports the service's export" peer import --peer 127.0.0.1:7470 --name from-service
check "and reads it (AAAAAAAA)" reads peer from-service 3 AAAAAAAA
check "the service imports the peer's export" svc import --peer 127.0.0.1:7471 --name from-peer
check "and reads it (BBBBBBBB)" reads svc from-peer 1 BBBBBBBB

pid=$(prop MainPID)
check "systemctl reload svmd" systemctl reload svmd
check "reload: svmd answers again (ReloadResult, RELOADING=1 then READY=1)" \
	wait_for 30 eval 'test "$(systemctl is-active svmd)" = active && svc status >/dev/null'
check "reload: the same process ($pid)" test "$(prop MainPID)" = "$pid"
check "reload: journal says 'reload: done'" grep -q 'reload: done' <<<"$(journalctl -b -u svmd --no-pager -o cat)"
check "reload: the service still lists its import" grep -q from-peer <<<"$(svc imports)"
check "reload: the import is live (peer's process stores C and Syncs)" cmd B "fill 1 1 67"
cmd B sync >/dev/null
check "reload: the service reads CCCCCCCC" reads svc from-peer 1 CCCCCCCC
check "reload: the service's export is live (remap to D)" cmd A "remap 3 1 68"
check "reload: the peer reads DDDDDDDD" reads peer from-service 3 DDDDDDDD

# The watchdog: a stopped svmd sends no WATCHDOG=1; after WatchdogSec
# systemd aborts it and Restart=on-failure starts a new one.
wsec=$(prop WatchdogUSec)
restarts=$(prop NRestarts)
start=$SECONDS
kill -STOP "$pid"
if wait_for 150 eval 'test "$(prop MainPID)" != "$pid" -a "$(prop MainPID)" != 0 -a "$(systemctl is-active svmd)" = active'; then
	ok "watchdog ($wsec): the SIGSTOPped svmd $pid was replaced by $(prop MainPID) after $((SECONDS - start)) s"
else
	bad "watchdog ($wsec): svmd $pid not restarted within 150 s (MainPID $(prop MainPID), $(systemctl is-active svmd))"
fi
check "watchdog: NRestarts went from $restarts to $((restarts + 1))" test "$(prop NRestarts)" = $((restarts + 1))
check "watchdog: the journal names the watchdog" \
	grep -q 'Watchdog timeout' <<<"$(journalctl -b -u svmd --no-pager -o cat)"
check "watchdog: the new svmd serves" wait_for 60 svc status
kill "$peer_pid" 2>/dev/null
echo exit >&"${EA[1]}"
echo exit >&"${EB[1]}"
wait "$peer_pid" 2>/dev/null

# A clean stop: SIGTERM, exit 0, no SIGKILL.
since=@$(date +%s)
start=$SECONDS
check "systemctl stop svmd" systemctl stop svmd
echo "  stop took $((SECONDS - start)) s"
check "stop: inactive" test "$(systemctl is-active svmd)" = inactive
check "stop: Result=success" test "$(prop Result)" = success
check "stop: svmd exited with status 0 (ExecMainStatus $(prop ExecMainStatus))" test "$(prop ExecMainStatus)" = 0
stop_journal=$(journalctl -u svmd --since "$since" --no-pager -o cat)
sed 's/^/  stop: /' <<<"$stop_journal"
check "stop: nothing was killed" not_in 'timed out\|Killing\|SIGKILL' "$stop_journal"
check "stop: the control socket is gone" test ! -e /run/svm/svmd.sock

# journald priorities. svmd logs "<N>"-prefixed lines: info at 6,
# warnings at 4. Everything `-p warning` shows must be a warning or error we
# expect here; svmd's routine lines (ready, reload: done) must not be there.
warn=$(journalctl -b -u svmd -p warning --no-pager -o json)
info=$(journalctl -b -u svmd -p info --no-pager -o json)
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }
echo "  journalctl -p warning -u svmd:"
journalctl -b -u svmd -p warning --no-pager -o short-monotonic | sed 's/^/    /'
check "journal: svmd's info lines are logged at priority 6" \
	grep -q '"PRIORITY":"6"' <<<"$(grep '"SYSLOG_IDENTIFIER":"svmd"' <<<"$info" | grep 'ready: ')"
check "journal: -p warning holds the peer-authentication warning (priority 4)" \
	grep -q 'peer authentication is OFF' <<<"$(grep '"PRIORITY":"4"' <<<"$warn")"
unexpected=$(while IFS= read -r line; do
	[[ -n $line ]] || continue
	id=$(field SYSLOG_IDENTIFIER <<<"$line")
	msg=$(field MESSAGE <<<"$line")
	case "$id:$msg" in
	"svmd:peer authentication is OFF"*) ;;
	systemd:*"Watchdog timeout"* | systemd:*"Killing process"*"SIGABRT"* | \
		systemd:*"Failed with result 'watchdog'"* | systemd:*"Main process exited"*) ;;
	*) echo "$id: $msg" ;;
	esac
done <<<"$warn")
check "journal: -p warning shows only the expected warnings and errors${unexpected:+ (unexpected: $unexpected)}" \
	test -z "$unexpected"
check "journal: no routine line of svmd under -p warning" not_in 'ready: \|reload: done' "$warn"
finish
