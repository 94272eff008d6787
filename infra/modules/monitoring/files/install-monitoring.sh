#!/usr/bin/env bash
# Installs the pinned Prometheus and Grafana releases (cloud-init runcmd, and
# again by hand after a change of /etc/gpupool/monitoring.env). The host has
# no internet: the tarballs come from the pool's artifact bucket (S3 gateway
# endpoint), at the exact S3 versions Terraform uploaded, and must have the
# sha256 pinned in infra/monitoring/releases.json (which the build host
# checked against the official release too).
set -euo pipefail
# shellcheck source=/dev/null
. /etc/gpupool/monitoring.env

fetch() { # KEY VERSION SHA256 DIR
    local tarball=/var/tmp/gpupool-$(basename "$1")
    aws --region "$GPUPOOL_INFRA_REGION" s3api get-object --bucket "$GPUPOOL_INFRA_BUCKET" \
        --key "$1" --version-id "$2" "$tarball" >/dev/null
    echo "$3  $tarball" | sha256sum --check --strict
    rm -rf "$4.new"
    mkdir -p "$4.new"
    tar -xzf "$tarball" -C "$4.new" --strip-components=1 --no-same-owner
    rm -rf "$4"
    mv "$4.new" "$4"
    rm -f "$tarball"
}

id prometheus >/dev/null 2>&1 || useradd --system --no-create-home --shell /sbin/nologin prometheus
id grafana >/dev/null 2>&1 || useradd --system --no-create-home --shell /sbin/nologin grafana

fetch "$GPUPOOL_INFRA_PROMETHEUS_KEY" "$GPUPOOL_INFRA_PROMETHEUS_VERSION" "$GPUPOOL_INFRA_PROMETHEUS_SHA256" /opt/prometheus
fetch "$GPUPOOL_INFRA_GRAFANA_KEY" "$GPUPOOL_INFRA_GRAFANA_VERSION" "$GPUPOOL_INFRA_GRAFANA_SHA256" /opt/grafana

install -d -o prometheus -g prometheus -m 0750 /var/lib/prometheus
install -d -o grafana -g grafana -m 0750 /var/lib/grafana /var/lib/grafana/plugins
install -d -m 0755 /var/log/gpupool
/opt/prometheus/promtool check config /etc/prometheus/prometheus.yml
