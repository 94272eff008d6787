#!/usr/bin/env bash
# Starts gpupool-balancer (ExecStart of gpupool-balancer.service). Settings come
# from /etc/gpupool/balancer.env (written by Terraform); secrets come from
# Secrets Manager at every start and live only in memory and under /run:
# - the lease-signing key: created here on the very first start (keygen) and
#   stored in its secret, then read back on every later start or replacement,
#   so leases stay verifiable and a restarted balancer can take back live ones;
# - its public key: written to its own secret, which the gpu-servers read;
# - the server secret (and the legacy shared client secret, while
#   allowed): created by Terraform; the tenants' credentials are not read
#   here: the tenants file (GPUPOOL_TENANTS_FILE, user data) holds their
#   SHA-256 digests only;
# - the gRPC TLS certificate and key: created by Terraform (signed by the
#   pool's CA, which clients verify the balancer with).
set -euo pipefail

aws() { command aws --region "$GPUPOOL_INFRA_REGION" "$@"; }
secret() { aws secretsmanager get-secret-value --secret-id "$1" --query SecretString --output text; }
has_value() {
    [[ $(aws secretsmanager list-secret-version-ids --secret-id "$1" --query 'length(Versions)' --output text) != 0 ]]
}

bin=/usr/local/bin/gpupool-balancer
stamp=/var/lib/gpupool/balancer.version
if [[ ! -x $bin || $(cat "$stamp" 2>/dev/null) != "$GPUPOOL_INFRA_BINARY_VERSION" ]]; then
    aws s3api get-object --bucket "$GPUPOOL_INFRA_BUCKET" --key "$GPUPOOL_INFRA_BINARY_KEY" \
        --version-id "$GPUPOOL_INFRA_BINARY_VERSION" "$bin.new" >/dev/null
    chmod 0755 "$bin.new"
    mv "$bin.new" "$bin"
    mkdir -p "$(dirname "$stamp")"
    echo "$GPUPOOL_INFRA_BINARY_VERSION" >"$stamp"
fi

umask 077
key=/run/gpupool/lease.key
mkdir -p /run/gpupool
rm -f "$key"
if has_value "$GPUPOOL_INFRA_SIGNING_KEY_SECRET"; then
    secret "$GPUPOOL_INFRA_SIGNING_KEY_SECRET" >"$key"
    public=$("$bin" keygen --key-file "$key")
else
    public=$("$bin" keygen --key-file "$key")
    aws secretsmanager put-secret-value --secret-id "$GPUPOOL_INFRA_SIGNING_KEY_SECRET" \
        --secret-string "file://$key" >/dev/null
    echo "start-balancer: created the lease-signing key and stored it in Secrets Manager"
fi
if ! has_value "$GPUPOOL_INFRA_PUBLIC_KEY_SECRET" || [[ $(secret "$GPUPOOL_INFRA_PUBLIC_KEY_SECRET") != "$public" ]]; then
    aws secretsmanager put-secret-value --secret-id "$GPUPOOL_INFRA_PUBLIC_KEY_SECRET" \
        --secret-string "$public" >/dev/null
fi
echo "start-balancer: lease public key $public"

tls=/run/gpupool/tls
mkdir -p "$tls"
secret "$GPUPOOL_INFRA_TLS_CERT_SECRET" >"$tls/cert.pem"
secret "$GPUPOOL_INFRA_TLS_KEY_SECRET" >"$tls/key.pem"
# The CA of the gpu-servers' client certificates, and what the operator's
# `gpupool-balancer status` on this host verifies the balancer with.
secret "$GPUPOOL_INFRA_TLS_CA_SECRET" >"$tls/ca.pem"

GPUPOOL_SERVER_SECRET=$(secret "$GPUPOOL_INFRA_SERVER_SECRET")
export GPUPOOL_SERVER_SECRET
if [[ -n ${GPUPOOL_INFRA_CLIENT_SECRET:-} ]]; then
    # Legacy (allow_shared_client_secret): the balancer logs a warning.
    GPUPOOL_CLIENT_SECRET=$(secret "$GPUPOOL_INFRA_CLIENT_SECRET")
    export GPUPOOL_CLIENT_SECRET GPUPOOL_ALLOW_SHARED_CLIENT_SECRET=true
fi
export GPUPOOL_KEY_FILE=$key
exec "$bin" serve --cert "$tls/cert.pem" --key "$tls/key.pem" --server-client-ca "$tls/ca.pem"
