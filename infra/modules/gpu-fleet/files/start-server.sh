#!/usr/bin/env bash
# Starts gpupool-server (ExecStart of gpupool-server.service). Settings come
# from /etc/gpupool/server.env (written by Terraform: GPUPOOL_* for the server,
# GPUPOOL_INFRA_* for this script); at every start it fetches the binary
# version Terraform names, reads the secrets from Secrets Manager (the
# server secret, the balancer's lease public key, the TLS certificate and key,
# the CA certificate the balancer's gRPC certificate is verified with, the
# client certificate and key presented to the balancer)
# and learns this host's address from the instance metadata (IMDSv2).
set -euo pipefail

aws() { command aws --region "$GPUPOOL_INFRA_REGION" "$@"; }
secret() { aws secretsmanager get-secret-value --secret-id "$1" --query SecretString --output text; }
imds() {
    local token
    token=$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
    curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

bin=/usr/local/bin/gpupool-server
stamp=/var/lib/gpupool/server.version
if [[ ! -x $bin || $(cat "$stamp" 2>/dev/null) != "$GPUPOOL_INFRA_BINARY_VERSION" ]]; then
    aws s3api get-object --bucket "$GPUPOOL_INFRA_BUCKET" --key "$GPUPOOL_INFRA_BINARY_KEY" \
        --version-id "$GPUPOOL_INFRA_BINARY_VERSION" "$bin.new" >/dev/null
    chmod 0755 "$bin.new"
    mv "$bin.new" "$bin"
    mkdir -p "$(dirname "$stamp")"
    echo "$GPUPOOL_INFRA_BINARY_VERSION" >"$stamp"
fi

# The balancer writes its public key on its first start; until then, wait
# (systemd restarts this script if it gives up).
for _ in $(seq 60); do
    GPUPOOL_LEASE_KEY=$(secret "$GPUPOOL_INFRA_PUBLIC_KEY_SECRET" 2>/dev/null) && break
    echo "start-server: waiting for the balancer's lease public key"
    sleep 10
done
[[ -n ${GPUPOOL_LEASE_KEY:-} ]] || { echo "start-server: no lease public key" >&2; exit 1; }

umask 077
tls=/run/gpupool/tls
mkdir -p "$tls"
secret "$GPUPOOL_INFRA_TLS_CERT_SECRET" >"$tls/cert.pem"
secret "$GPUPOOL_INFRA_TLS_KEY_SECRET" >"$tls/key.pem"
secret "$GPUPOOL_INFRA_BALANCER_CA" >"$tls/balancer-ca.pem"
secret "$GPUPOOL_INFRA_CLIENT_CERT" >"$tls/balancer-client-cert.pem"
secret "$GPUPOOL_INFRA_CLIENT_KEY" >"$tls/balancer-client-key.pem"

GPUPOOL_SERVER_SECRET=$(secret "$GPUPOOL_INFRA_SERVER_SECRET")
GPUPOOL_ADVERTISE="$(imds local-ipv4):${GPUPOOL_LISTEN##*:}"
GPUPOOL_SERVER_ID=$(imds instance-id)
export GPUPOOL_LEASE_KEY GPUPOOL_SERVER_SECRET GPUPOOL_ADVERTISE GPUPOOL_SERVER_ID
export GPUPOOL_CERT=$tls/cert.pem GPUPOOL_KEY=$tls/key.pem GPUPOOL_BALANCER_CA_FILE=$tls/balancer-ca.pem
export GPUPOOL_BALANCER_CLIENT_CERT=$tls/balancer-client-cert.pem GPUPOOL_BALANCER_CLIENT_KEY=$tls/balancer-client-key.pem
mkdir -p "$GPUPOOL_IMAGE_CACHE"
exec "$bin"
