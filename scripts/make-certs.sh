#!/usr/bin/env bash
# Create a CA and a SuperLink server certificate with openssl.
#   scripts/make-certs.sh <out-dir> [extra-host-or-ip ...]
# The certificate always names localhost and 127.0.0.1 (the Fleet proxy checks the SuperLink as
# `localhost`, the operator's flwr CLI dials 127.0.0.1); every argument after <out-dir> is added
# to them: the address (IP or DNS name) the SuperNodes dial.
# <out-dir> must be outside any git work tree, or a folder its .gitignore covers: the script
# refuses to put private keys where `git add` would pick them up.
# Writes ca.crt/ca.key and server.pem/server.key (+ server.csr). Give the SuperLink (and the
# Fleet proxy, deploy/nginx-fleet.conf.template)
#   --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
# and every SuperNode / the flwr CLI the CA: --root-certificates ca.crt / root-certificates = ".../ca.crt"
# Of these only ca.crt leaves this machine. Every private key (ca.key, server.key, node keys) is
# created mode 0600 (umask 077), never readable by others, not even for a moment.
# Environment (optional):
#   NODE_KEYS=N     also write one SuperNode key pair per node, supernode-0 .. supernode-<N-1>
#                   (+ .pub), ECDSA P-384 as `flower-supernode --auth-supernode-private-key`
#                   and `flwr supernode register` take them. For nodes on this host (Docker);
#                   a node on another machine makes its own pair and sends only the .pub
#   RSA_BITS=N      size of the CA and server RSA keys (default 4096; the tests use 2048)
#   KEY_OWNER=UID   chown server.key and the node keys to UID (needs root), still 0600: for a
#                   SuperLink/SuperNode container that runs as another user (Docker: 49999)
set -euo pipefail
out=${1:?usage: make-certs.sh <out-dir> [extra-host-or-ip ...]}; shift || true
hosts=(localhost 127.0.0.1)
for h in "$@"; do
  [ -n "$h" ] || continue
  dup=0; for k in "${hosts[@]}"; do [ "$k" = "$h" ] && dup=1; done
  [ $dup = 1 ] || hosts+=("$h")
done
probe=$out; while [ ! -d "$probe" ]; do probe=$(dirname -- "$probe"); done
if command -v git >/dev/null && top=$(git -C "$probe" rev-parse --show-toplevel 2>/dev/null); then
  abs=$(realpath -m -- "$out")
  if ! git -C "$top" check-ignore -q -- "$abs/ca.key"; then
    echo "make-certs.sh: refused: $abs is inside the git work tree $top and not ignored by" \
         "its .gitignore; private keys (ca.key, server.key) would be tracked. Choose a folder" \
         "outside it (e.g. ~/.config/fedlora/certs) or an ignored one (docker/certs)." >&2
    exit 2
  fi
fi
mkdir -p "$out"; cd "$out"
umask 077   # every file below starts as 0600; the public ones are opened up at the end
san=""; i=0; j=0
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then i=$((i+1)); san+="IP.$i = $h"$'\n'
  else j=$((j+1)); san+="DNS.$j = $h"$'\n'; fi
done
cat > server.cnf <<CNF
[req]
distinguished_name = dn
req_extensions = v3_req
prompt = no
[dn]
CN = ${hosts[0]}
[v3_req]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[alt]
$san
CNF
openssl genrsa -out ca.key "${RSA_BITS:-4096}" 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=fedlora-ca" -out ca.crt
openssl genrsa -out server.key "${RSA_BITS:-4096}" 2>/dev/null
openssl req -new -key server.key -config server.cnf -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extensions v3_req -extfile server.cnf -out server.pem 2>/dev/null
chmod 600 ca.key server.key
chmod 644 ca.crt server.pem
keys=(server.key)
for ((n = 0; n < ${NODE_KEYS:-0}; n++)); do
  rm -f "supernode-$n" "supernode-$n.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$n" -f "supernode-$n" </dev/null
  chmod 600 "supernode-$n"; chmod 644 "supernode-$n.pub"
  keys+=("supernode-$n")
done
if [ -n "${KEY_OWNER:-}" ]; then chown "$KEY_OWNER" "${keys[@]}"; fi
echo "certificates in $PWD for: ${hosts[*]}"
