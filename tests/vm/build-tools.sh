#!/usr/bin/env bash
# Compile the guest-side test programs (host gcc; the guest chroots into the
# host root, so host binaries run there). Usage: build-tools.sh OUT_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
mkdir -p "$out"
cflags=(-O2 -g -Wall -Wextra -Werror -pthread -I"$here/../../driver-shim/include/uapi")
for t in shim_tests shim_fuzz bench_shim dax_tests; do
	[[ -f $here/$t.c ]] || continue
	gcc "${cflags[@]}" -o "$out/$t" "$here/$t.c"
done
