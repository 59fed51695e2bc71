#!/usr/bin/env bash
# Create a CA and a SuperLink server certificate with openssl.
#   scripts/make-certs.sh <out-dir> [host-or-ip ...]      (default SANs: localhost 127.0.0.1)
# Writes ca.crt/ca.key and server.pem/server.key (+ server.csr). Give the SuperLink
#   --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
# and every SuperNode / the flwr CLI the CA: --root-certificates ca.crt / root-certificates = ".../ca.crt"
set -euo pipefail
out=${1:?usage: make-certs.sh <out-dir> [host-or-ip ...]}; shift || true
hosts=("$@"); [ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)
mkdir -p "$out"; cd "$out"
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
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=fedlora-ca" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -config server.cnf -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extensions v3_req -extfile server.cnf -out server.pem 2>/dev/null
chmod 644 ca.crt server.pem server.key
echo "certificates in $PWD for: ${hosts[*]}"
