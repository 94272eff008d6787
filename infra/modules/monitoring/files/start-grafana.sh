#!/usr/bin/env bash
# Starts Grafana (ExecStart of gpupool-grafana.service, as user grafana). Its
# admin password lives in Secrets Manager only (made by Terraform, encrypted
# with the pool's key) and is read at every start into this process's
# environment, never into a file or the user data. Grafana applies it when it
# creates its database (the first start); each later start sets it again, so
# the secret stays the password.
set -euo pipefail
# shellcheck source=/dev/null
. /etc/gpupool/monitoring.env

GF_SECURITY_ADMIN_PASSWORD=$(aws --region "$GPUPOOL_INFRA_REGION" secretsmanager get-secret-value \
    --secret-id "$GPUPOOL_INFRA_GRAFANA_ADMIN_SECRET" --query SecretString --output text)
export GF_SECURITY_ADMIN_PASSWORD
if [[ -f /var/lib/grafana/grafana.db ]]; then
    /opt/grafana/bin/grafana cli --homepath /opt/grafana --config /etc/grafana/grafana.ini \
        admin reset-admin-password --password-from-stdin <<<"$GF_SECURITY_ADMIN_PASSWORD" >/dev/null ||
        echo "start-grafana: could not set the admin password from its secret; Grafana keeps the old one" >&2
fi
exec /opt/grafana/bin/grafana server --homepath /opt/grafana --config /etc/grafana/grafana.ini
