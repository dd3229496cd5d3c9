#!/usr/bin/env bash
# One CTest entry of the VM tier: boot one kernel once and run the shim's
# behaviour tests and ioctl fuzz loop in it (see guest-suite.sh).
#
#   vm-shim-suite.sh --kernel stable|unstable --cache DIR --build DIR [--fuzz SECONDS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=digest.sh
source "$here/digest.sh"
kernel=
cache=
build=
fuzz=25
while (($#)); do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--build) build=$2; shift 2 ;;
	--fuzz) fuzz=$2; shift 2 ;;
	*) echo "vm-shim-suite: unknown argument $1" >&2; exit 2 ;;
	esac
done
[[ -n $kernel && -n $cache && -n $build ]] ||
	{ echo "vm-shim-suite: --kernel, --cache and --build are required" >&2; exit 2; }
"$here/install-vm-deps.sh"
mkdir -p "$build"
build=$(cd "$build" && pwd)
"$here/build-tools.sh" "$build/vm-bin"
logs=$build/vm-logs/$kernel
rm -rf "$logs"
start=$(date +%s)
rc=0
run_digested "$logs/output.log" "$here/run-vm.sh" --kernel "$kernel" --cache "$cache" --log "$logs" --timeout 900 -- \
	bash "$here/guest-suite.sh" "$build/vm-bin" "$fuzz" || rc=$?
echo "vm_shim_$kernel: exit $rc after $(($(date +%s) - start)) s (logs: $logs)"
exit "$rc"
