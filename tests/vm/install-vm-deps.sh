#!/usr/bin/env bash
# Host packages the VM tier needs (kernels are downloaded into the cache,
# never installed). Idempotent: returns at once when all are present.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static cpio debootstrap xz-utils zstd kmod
      gcc make libc6-dev perl rdma-core ibverbs-utils ibverbs-providers
      perftest iproute2 debian-archive-keyring ca-certificates
      ndctl daxctl e2fsprogs util-linux socat)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
if [[ $(id -u) -ne 0 ]]; then
	echo "install-vm-deps: missing ${missing[*]}; run as root" >&2
	exit 1
fi
echo "install-vm-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
