#!/usr/bin/env bash
# Installs every Debian package svm needs to build, test and demo.
# Used by both README commands and therefore by CI. Idempotent: when every
# package is already installed it returns without touching apt.
set -euo pipefail

pkgs=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libspdlog-dev libfmt-dev libabsl-dev
  libibverbs-dev rdma-core ibverbs-utils ibverbs-providers
  libsystemd-dev libgtest-dev libgmock-dev googletest
  iproute2 nftables procps python3
  dpkg-dev file lintian systemd man-db
  clang libclang-rt-14-dev
  prometheus-cpp-dev prometheus curl
  libssl-dev openssl   # peer TLS checks; scripts/make-test-ca.sh (tls_test)
)
# The VM tier needs these on top (kernels are downloaded, never installed).
if [[ "${SVM_WITH_VM:-0}" == "1" ]]; then
  pkgs+=(qemu-system-x86 busybox-static cpio debootstrap xz-utils kmod
         perftest rdma-core zstd)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: missing packages ${missing[*]}; run as root or install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
