# The pool's monitoring host: one small EC2 instance (Amazon Linux 2023) in a
# private subnet, running Prometheus and Grafana under systemd.
#
# - Prometheus scrapes the balancer and the gpu-servers with the root's
#   configuration (infra/monitoring/prometheus.yml.tftpl, the same text the
#   example outputs as prometheus_config) through the network module's
#   monitoring security group, which the pool's groups let reach their
#   metrics port; it finds the gpu-servers through the EC2 API (endpoint).
# - Grafana has the Prometheus datasource and the gpupool dashboard
#   (infra/monitoring/grafana-dashboard.json) provisioned; its admin password
#   is a random_password kept in Secrets Manager and read at each start.
# - The VPC has no internet, so the pinned releases come from the artifact
#   bucket (infra/fetch-monitoring.py fetched them from the official URLs and
#   checked their sha256; the host checks it again).
# - Prometheus and Grafana accept connections from allowed_cidrs only (the
#   VPC by default); from outside, Session Manager's port forwarding reaches
#   them (infra/README.md, "Monitoring").

data "aws_region" "current" {}
data "aws_partition" "current" {}

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

locals {
  region        = data.aws_region.current.name
  partition     = data.aws_partition.current.partition
  log_group     = "/${var.name}/monitoring"
  agent_conf    = "/opt/aws/amazon-cloudwatch-agent/etc/gpupool.json"
  allowed_cidrs = coalesce(var.allowed_cidrs, [var.vpc_cidr])
  object_arn    = "arn:${local.partition}:s3:::${var.artifact_bucket}"
}

# --- Grafana's admin password ------------------------------------------------

resource "random_password" "grafana_admin" {
  length  = 32
  special = false
}

resource "aws_secretsmanager_secret" "grafana_admin" {
  #checkov:skip=CKV2_AWS_57:Grafana takes the password from this secret at each start (start-grafana.sh); rotate with terraform apply -replace on the random_password and a restart of gpupool-grafana.service, which a rotation Lambda cannot do.
  name_prefix             = "${var.name}/monitoring/grafana-admin-"
  description             = "Password of Grafana's admin user on the gpupool monitoring host."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "grafana_admin" {
  secret_id     = aws_secretsmanager_secret.grafana_admin.id
  secret_string = random_password.grafana_admin.result
}

# --- security group: Prometheus and Grafana from allowed_cidrs ----------------
# Scraping and the AWS APIs go through the network module's monitoring group,
# which the instance has too; this group only lets people in.

resource "aws_security_group" "this" {
  name_prefix = "${var.name}-monitoring-ui-"
  description = "gpupool monitoring host: Prometheus and Grafana from the allowed CIDR blocks only"
  vpc_id      = var.vpc_id
  tags        = { Name = "${var.name}-monitoring-ui" }
  lifecycle {
    create_before_destroy = true
  }
}

locals {
  ui_rules = merge([for cidr in local.allowed_cidrs : {
    "prometheus ${cidr}" = { port = var.prometheus_port, cidr = cidr, what = "Prometheus" }
    "grafana ${cidr}"    = { port = var.grafana_port, cidr = cidr, what = "Grafana" }
  }]...)
}

resource "aws_vpc_security_group_ingress_rule" "ui" {
  for_each          = local.ui_rules
  security_group_id = aws_security_group.this.id
  description       = "${each.value.what} from ${each.value.cidr}"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

# --- IAM and logs (modules/instance-role) ------------------------------------

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "FetchGrafana"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${local.object_arn}/${var.grafana.key}"]
  }
  statement {
    sid       = "ReadGrafanaAdminPassword"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.grafana_admin.arn]
  }
  statement {
    # Prometheus' ec2_sd_configs; these Describe actions support no
    # resource-level scoping.
    sid       = "DiscoverGpuServers"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeAvailabilityZones"]
    resources = ["*"]
  }
}

module "role" {
  source             = "../instance-role"
  name_prefix        = "${var.name}-monitoring-"
  kms_key_arn        = var.kms_key_arn
  log_group_name     = local.log_group
  log_retention_days = var.log_retention_days
  binary_arn         = "${local.object_arn}/${var.prometheus.key}"
  policy_json        = data.aws_iam_policy_document.this.json
}

# --- the instance ----------------------------------------------------------------

locals {
  env = join("", [for k, v in {
    GPUPOOL_INFRA_REGION               = local.region
    GPUPOOL_INFRA_BUCKET               = var.artifact_bucket
    GPUPOOL_INFRA_PROMETHEUS_KEY       = var.prometheus.key
    GPUPOOL_INFRA_PROMETHEUS_VERSION   = var.prometheus.object_version
    GPUPOOL_INFRA_PROMETHEUS_SHA256    = var.prometheus.sha256
    GPUPOOL_INFRA_GRAFANA_KEY          = var.grafana.key
    GPUPOOL_INFRA_GRAFANA_VERSION      = var.grafana.object_version
    GPUPOOL_INFRA_GRAFANA_SHA256       = var.grafana.sha256
    GPUPOOL_INFRA_GRAFANA_ADMIN_SECRET = aws_secretsmanager_secret.grafana_admin.arn
    GPUPOOL_PROMETHEUS_RETENTION       = var.retention
    GPUPOOL_PROMETHEUS_PORT            = tostring(var.prometheus_port)
  } : "${k}=${v}\n"])

  # Offline: no update checks, usage reports, news or plugin downloads (the
  # host has no internet); no sign-up, no anonymous access.
  grafana_ini = <<-EOT
    [paths]
    data = /var/lib/grafana
    logs = /var/lib/grafana/log
    plugins = /var/lib/grafana/plugins
    provisioning = /etc/grafana/provisioning
    [server]
    http_port = ${var.grafana_port}
    [log]
    mode = console
    [security]
    admin_user = admin
    disable_gravatar = true
    [users]
    allow_sign_up = false
    [auth.anonymous]
    enabled = false
    [analytics]
    reporting_enabled = false
    check_for_updates = false
    check_for_plugin_updates = false
    [news]
    news_feed_enabled = false
    [plugins]
    preinstall_disabled = true
    [dashboards]
    default_home_dashboard_path = /etc/grafana/dashboards/gpupool.json
  EOT

  datasources = yamlencode({
    apiVersion = 1
    datasources = [{
      name      = "Prometheus"
      uid       = "prometheus"
      type      = "prometheus"
      access    = "proxy"
      url       = "http://localhost:${var.prometheus_port}"
      isDefault = true
      editable  = false
    }]
  })

  dashboards = yamlencode({
    apiVersion = 1
    providers = [{
      name                  = "gpupool"
      type                  = "file"
      disableDeletion       = true
      allowUiUpdates        = false
      updateIntervalSeconds = 60
      options               = { path = "/etc/grafana/dashboards" }
    }]
  })

  agent = jsonencode({
    agent = { run_as_user = "root" }
    logs = {
      logs_collected = {
        files = {
          collect_list = [for f in ["prometheus", "grafana"] : {
            file_path       = "/var/log/gpupool/${f}.log"
            log_group_name  = local.log_group
            log_stream_name = "{instance_id}/${f}"
          }]
        }
      }
    }
  })

  user_data = join("\n", ["#cloud-config", yamlencode({
    write_files = [
      { path = "/etc/gpupool/monitoring.env", permissions = "0644", content = local.env },
      { path = "/etc/prometheus/prometheus.yml", permissions = "0644", content = var.prometheus_config },
      { path = "/etc/grafana/grafana.ini", permissions = "0644", content = local.grafana_ini },
      { path = "/etc/grafana/provisioning/datasources/prometheus.yaml", permissions = "0644", content = local.datasources },
      { path = "/etc/grafana/provisioning/dashboards/gpupool.yaml", permissions = "0644", content = local.dashboards },
      { path = "/etc/grafana/dashboards/gpupool.json", permissions = "0644", content = var.dashboard_json },
      { path = "/usr/local/lib/gpupool/install-monitoring.sh", permissions = "0755", content = file("${path.module}/files/install-monitoring.sh") },
      { path = "/usr/local/lib/gpupool/start-grafana.sh", permissions = "0755", content = file("${path.module}/files/start-grafana.sh") },
      { path = "/etc/systemd/system/gpupool-prometheus.service", permissions = "0644", content = file("${path.module}/files/gpupool-prometheus.service") },
      { path = "/etc/systemd/system/gpupool-grafana.service", permissions = "0644", content = file("${path.module}/files/gpupool-grafana.service") },
      { path = local.agent_conf, permissions = "0644", content = local.agent },
      { path = "/etc/logrotate.d/gpupool", permissions = "0644", content = "/var/log/gpupool/*.log {\n  daily\n  rotate 7\n  compress\n  missingok\n  copytruncate\n}\n" },
    ]
    runcmd = [
      ["mkdir", "-p", "/var/log/gpupool"],
      # Amazon Linux's package mirrors are S3 buckets: reached through the VPC's S3 gateway endpoint.
      ["dnf", "install", "-y", "amazon-cloudwatch-agent"],
      ["/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl", "-a", "fetch-config", "-m", "ec2", "-s", "-c", "file:${local.agent_conf}"],
      ["/usr/local/lib/gpupool/install-monitoring.sh"],
      ["systemctl", "daemon-reload"],
      ["systemctl", "enable", "--now", "gpupool-prometheus.service", "gpupool-grafana.service"],
    ]
  })])
  # EC2 takes at most 16 KiB of user data, counted after base64 decoding,
  # i.e. the gzip here (the dashboard is most of it, and compresses well).
  user_data_base64 = base64gzip(local.user_data)
}

resource "aws_instance" "this" {
  ami                         = nonsensitive(data.aws_ssm_parameter.al2023.value)
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  associate_public_ip_address = false
  vpc_security_group_ids      = [aws_security_group.this.id, var.scrape_security_group_id]
  iam_instance_profile        = module.role.instance_profile_name
  monitoring                  = true
  ebs_optimized               = true
  user_data_base64            = local.user_data_base64
  # A new release, scrape configuration or dashboard rewrites the user data:
  # the instance is replaced (Prometheus' samples start over; the dashboard
  # and the password come back from Terraform).
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.volume_size_gib
    encrypted             = true
    kms_key_id            = var.kms_key_arn
    delete_on_termination = true
  }

  maintenance_options {
    auto_recovery = "default"
  }

  tags = { Name = "${var.name}-monitoring" }

  lifecycle {
    # A newer Amazon Linux image alone does not replace the host.
    ignore_changes = [ami]
    precondition {
      condition     = floor(length(local.user_data_base64) / 4) * 3 <= 16384
      error_message = "The monitoring host's gzipped user data is over EC2's 16 KiB: a smaller dashboard or scrape configuration, or move them to the artifact bucket."
    }
  }

  depends_on = [aws_secretsmanager_secret_version.grafana_admin, module.role]
}
