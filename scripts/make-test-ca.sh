#!/bin/sh
# Makes a test CA and node certificates for svmd's mutual TLS
# (--tls-cert/--tls-key/--tls-ca), with openssl. For tests and trials: the
# keys are written unencrypted. docs/operations.md, "Securing peers".
#
#   scripts/make-test-ca.sh [options] DIR [NODE...]
#
# Creates DIR/CA.pem and DIR/CA.key (CA: --ca, default "ca") unless they
# exist, then for each NODE a key DIR/NODE.key and a certificate DIR/NODE.pem
# signed by that CA (replacing earlier ones), with the subject alternative
# names DNS:NODE (the node's identity in export access lists: every DNS and
# URI name of a certificate is one, so add only names of this node) and
# IP:127.0.0.1 (the exporter's certificate must name the address its
# importers dial: add it with --ip or --dns).
#   --ca NAME     the CA's file name and common name (default ca)
#   --days N      validity of new certificates (default 365)
#   --ip ADDR     one more IP subject alternative name (repeatable)
#   --dns NAME    one more DNS subject alternative name (repeatable)
#   --expired     the node certificates' validity ended in the past (2020)
set -eu

ca=ca days=365 extra="" expired=0
while [ $# -gt 0 ]; do
  case "$1" in
    --ca) ca=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --ip) extra="$extra,IP:$2"; shift 2 ;;
    --dns) extra="$extra,DNS:$2"; shift 2 ;;
    --expired) expired=1; shift ;;
    -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "make-test-ca.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: make-test-ca.sh [options] DIR [NODE...]" >&2; exit 2; }
dir=$1; shift
command -v openssl >/dev/null || { echo "make-test-ca.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$dir"
umask 077

if [ ! -f "$dir/$ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -days 3650 -subj "/CN=$ca" -keyout "$dir/$ca.key" -out "$dir/$ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
fi

for node in "$@"; do
  work=$(mktemp -d)
  san="DNS:$node,IP:127.0.0.1$extra"
  cat > "$work/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EOF
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -subj "/CN=$node" -keyout "$work/key" -out "$work/csr" 2>/dev/null
  if [ "$expired" = 1 ]; then
    # `openssl x509` cannot set a start date in the past: `openssl ca` can.
    mkdir -p "$work/ca"
    : > "$work/ca/index.txt"
    cat > "$work/ca.cnf" <<EOF
[ca]
default_ca = test
[test]
database = $work/ca/index.txt
new_certs_dir = $work/ca
serial = $work/ca/serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[any]
commonName = supplied
EOF
    openssl rand -hex 16 > "$work/ca/serial"
    openssl ca -batch -notext -config "$work/ca.cnf" -cert "$dir/$ca.pem" -keyfile "$dir/$ca.key" \
      -startdate 20200101000000Z -enddate 20200201000000Z -extfile "$work/ext.cnf" \
      -in "$work/csr" -out "$work/pem" 2>/dev/null
  else
    openssl x509 -req -sha256 -days "$days" -in "$work/csr" -CA "$dir/$ca.pem" -CAkey "$dir/$ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/ext.cnf" -out "$work/pem" 2>/dev/null
  fi
  mv "$work/key" "$dir/$node.key"
  mv "$work/pem" "$dir/$node.pem"
  rm -rf "$work"
done
