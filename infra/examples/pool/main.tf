# A whole gpupool on AWS: network, KMS key and artifact bucket, balancer, GPU
# server fleet, the Lambda layer with the example function, and a monitoring
# host (Prometheus and Grafana). infra/README.md walks through it.

locals {
  # One place for the ports that the security groups open and the servers use.
  quic_port     = 4433
  worker_ports  = [4434, 4499]
  balancer_port = 50051

  artifacts = coalesce(var.artifacts_dir, "${path.root}/../../../target/infra")
  binaries = {
    "bin/gpupool-server"   = "${local.artifacts}/gpupool-server"
    "bin/gpupool-balancer" = "${local.artifacts}/gpupool-balancer"
  }

  # The monitoring host needs the metrics endpoints. Its Prometheus and
  # Grafana releases are pinned (version, URL, sha256) in one file, which
  # infra/fetch-monitoring.py downloads and verifies them from.
  monitoring = var.monitoring.enabled && var.metrics_port != null
  releases   = jsondecode(file("${path.module}/../../monitoring/releases.json"))
  monitoring_artifacts = { for what, r in local.releases :
    what => { key = "monitoring/${basename(r.url)}", path = "${local.artifacts}/monitoring/${basename(r.url)}" }
  }

  # The scrape configuration: the output prometheus_config and the monitoring
  # host's /etc/prometheus/prometheus.yml are this one text.
  prometheus_config = var.metrics_port == null ? null : templatefile("${path.module}/../../monitoring/prometheus.yml.tftpl", {
    region           = var.region
    balancer_address = module.balancer.address
    metrics_port     = var.metrics_port
    gpu_server_name  = "${var.name}-gpu-server"
  })
}

module "foundation" {
  source = "../../modules/foundation"
  name   = var.name
  artifacts = merge(local.binaries, local.monitoring ? {
    for a in values(local.monitoring_artifacts) : a.key => a.path
  } : {})
}

module "network" {
  source             = "../../modules/network"
  name               = var.name
  kms_key_arn        = module.foundation.kms_key_arn
  vpc_cidr           = var.vpc_cidr
  availability_zones = var.availability_zones
  quic_port          = local.quic_port
  worker_ports       = local.worker_ports
  balancer_port      = local.balancer_port
  metrics_port       = var.metrics_port
  log_retention_days = var.log_retention_days
}

module "balancer" {
  source            = "../../modules/balancer"
  name              = var.name
  kms_key_arn       = module.foundation.kms_key_arn
  subnet_id         = module.network.private_subnet_ids[0]
  security_group_id = module.network.balancer_security_group_id
  artifact_bucket   = module.foundation.artifact_bucket
  binary_key        = "bin/gpupool-balancer"
  binary_version    = module.foundation.artifact_versions["bin/gpupool-balancer"]
  port              = local.balancer_port
  policy            = var.balancer_policy
  quotas            = var.balancer_quotas
  # Every tenant, the example function's included, gets its own credential.
  tenants                    = merge({ (var.lambda_tenant) = {} }, var.tenants)
  allow_shared_client_secret = var.allow_shared_client_secret
  metrics_port               = var.metrics_port
  log_retention_days         = var.log_retention_days
}

module "gpu_fleet" {
  source                      = "../../modules/gpu-fleet"
  name                        = var.name
  kms_key_arn                 = module.foundation.kms_key_arn
  subnet_ids                  = module.network.private_subnet_ids
  security_group_id           = module.network.gpu_server_security_group_id
  instance_type               = var.instance_type
  mig_layout                  = var.mig_layout
  server_count                = var.gpu_server_count
  capacity_reservation_id     = var.capacity_reservation_id
  quic_port                   = local.quic_port
  worker_ports                = local.worker_ports
  balancer_url                = module.balancer.url
  server_secret_arn           = module.balancer.server_secret_arn
  lease_public_key_secret_arn = module.balancer.public_key_secret_arn
  balancer_ca_secret_arn      = module.balancer.tls_ca_secret_arn
  balancer_client_tls         = module.balancer.server_client_tls_secret_arns
  artifact_bucket             = module.foundation.artifact_bucket
  binary_key                  = "bin/gpupool-server"
  binary_version              = module.foundation.artifact_versions["bin/gpupool-server"]
  metrics_port                = var.metrics_port
  log_retention_days          = var.log_retention_days
}

module "lambda" {
  source             = "../../modules/lambda"
  name               = var.name
  kms_key_arn        = module.foundation.kms_key_arn
  architecture       = var.lambda_architecture
  layer_zip          = "${local.artifacts}/gpupool-layer-${var.lambda_architecture}.zip"
  function_zip       = var.lambda_image_uri == null ? "${local.artifacts}/gpupool-lambda-example-${var.lambda_architecture}.zip" : null
  image_uri          = var.lambda_image_uri
  subnet_ids         = module.network.private_subnet_ids
  security_group_id  = module.network.client_security_group_id
  balancer_url       = module.balancer.url
  client_secret      = module.balancer.tenant_secrets[var.lambda_tenant]
  balancer_ca_pem    = module.balancer.tls_ca_pem
  max_concurrency    = var.lambda_max_concurrency
  log_retention_days = var.log_retention_days
}

module "monitoring" {
  source                   = "../../modules/monitoring"
  count                    = local.monitoring ? 1 : 0
  name                     = var.name
  kms_key_arn              = module.foundation.kms_key_arn
  vpc_id                   = module.network.vpc_id
  vpc_cidr                 = module.network.vpc_cidr
  subnet_id                = module.network.private_subnet_ids[0]
  scrape_security_group_id = module.network.monitoring_security_group_id
  allowed_cidrs            = var.monitoring.allowed_cidrs
  instance_type            = var.monitoring.instance_type
  volume_size_gib          = var.monitoring.volume_size_gib
  retention                = var.monitoring.retention
  artifact_bucket          = module.foundation.artifact_bucket
  prometheus = {
    version        = local.releases.prometheus.version
    sha256         = local.releases.prometheus.sha256
    key            = local.monitoring_artifacts.prometheus.key
    object_version = module.foundation.artifact_versions[local.monitoring_artifacts.prometheus.key]
  }
  grafana = {
    version        = local.releases.grafana.version
    sha256         = local.releases.grafana.sha256
    key            = local.monitoring_artifacts.grafana.key
    object_version = module.foundation.artifact_versions[local.monitoring_artifacts.grafana.key]
  }
  prometheus_config  = local.prometheus_config
  dashboard_json     = file("${path.module}/../../monitoring/grafana-dashboard.json")
  log_retention_days = var.log_retention_days
}
