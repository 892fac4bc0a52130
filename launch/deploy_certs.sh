#!/usr/bin/env bash
# TLS certificates and SuperNode authentication keys for a fedlt federation under Flower's Deployment Engine
# (README "Deployment with flwr run / SuperLink"). Usage: bash launch/deploy_certs.sh SUPERLINK_HOST [NUM_CLIENTS]
#   certificates/ca.crt, ca.key        a private CA (keep ca.key offline)
#   certificates/server.pem, .key      the SuperLink's certificate for SUPERLINK_HOST (a DNS name or an IP)
#   keys/supernode_<i>, .pub           one ECDSA key pair per client (register each .pub with the SuperLink)
# Existing files are never overwritten: delete them to make new ones.
set -euo pipefail
host=${1:?usage: deploy_certs.sh SUPERLINK_HOST [NUM_CLIENTS]}
n=${2:-2}
mkdir -p certificates keys
cd certificates
if [ ! -f ca.crt ]; then
  openssl genrsa -out ca.key 4096 2>/dev/null
  openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=fedlt-federation-ca" -out ca.crt
fi
if [ ! -f server.pem ]; then
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="IP:$host"; else san="DNS:$host"; fi
  openssl genrsa -out server.key 4096 2>/dev/null
  openssl req -new -key server.key -subj "/CN=$host" -out server.csr
  printf 'subjectAltName=%s,IP:127.0.0.1,DNS:localhost\n' "$san" > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
  rm -f server.csr server.ext
fi
cd ../keys
for ((i = 0; i < n; i++)); do
  [ -f "supernode_$i" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -f "supernode_$i"
done
chmod 600 ../certificates/*.key supernode_* ; chmod 644 ../certificates/*.crt ../certificates/server.pem supernode_*.pub
echo "certificates/ and keys/ ready for $host ($n SuperNodes)"
