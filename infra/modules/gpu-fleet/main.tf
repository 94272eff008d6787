# The GPU server fleet: an auto-scaling group of MIG-capable instances from
# one launch template. At every boot, gpupool-mig.service brings every GPU to
# the MIG layout (MIG mode survives a reboot; GPU and compute instances do
# not), then gpupool-server.service starts the server, which registers the
# instances with the balancer.

data "aws_region" "current" {}
data "aws_partition" "current" {}

data "aws_ssm_parameter" "ami" {
  name = var.ami_ssm_parameter
}

locals {
  # One table for Terraform and the server: tests/tests/infra.rs checks it
  # against gpu-server/src/mig/profiles.rs.
  mig      = jsondecode(file("${path.module}/mig-profiles.json"))
  model    = lookup(local.mig.instance_types, var.instance_type, null)
  profiles = local.model == null ? {} : local.mig.models[local.model].profiles


  region    = data.aws_region.current.name
  partition = data.aws_partition.current.partition
  log_group = "/${var.name}/gpu-server"

  own_tls    = var.tls_secret_arns != null
  tls_cert   = local.own_tls ? var.tls_secret_arns.cert : aws_secretsmanager_secret.tls_cert[0].arn
  tls_key    = local.own_tls ? var.tls_secret_arns.key : aws_secretsmanager_secret.tls_key[0].arn
  agent_conf = "/opt/aws/amazon-cloudwatch-agent/etc/gpupool.json"
}

# --- TLS certificate (unless the operator brings one) ----------------------
# Clients pin the server certificate by the SHA-256 that the lease carries, so
# one self-signed certificate shared by the fleet is enough; it lives in
# Secrets Manager and is written to /run (tmpfs) at each start.

resource "tls_private_key" "server" {
  count       = local.own_tls ? 0 : 1
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "server" {
  count                 = local.own_tls ? 0 : 1
  private_key_pem       = tls_private_key.server[0].private_key_pem
  validity_period_hours = 24 * 365 * 2
  early_renewal_hours   = 24 * 60
  allowed_uses          = ["digital_signature", "server_auth"]
  dns_names             = ["gpupool-server", "localhost"]
  subject {
    common_name  = "gpupool-server"
    organization = var.name
  }
}

resource "aws_secretsmanager_secret" "tls_cert" {
  #checkov:skip=CKV2_AWS_57:Renewed by Terraform (a new certificate at the first apply within 60 days of expiry), which changes the launch template and rolls the fleet; a rotation Lambda could not restart the servers.
  count                   = local.own_tls ? 0 : 1
  name_prefix             = "${var.name}/gpu-server/tls-cert-"
  description             = "PEM certificate of the gpu-servers."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "tls_cert" {
  count         = local.own_tls ? 0 : 1
  secret_id     = aws_secretsmanager_secret.tls_cert[0].id
  secret_string = tls_self_signed_cert.server[0].cert_pem
}

resource "aws_secretsmanager_secret" "tls_key" {
  #checkov:skip=CKV2_AWS_57:Renewed with the certificate by Terraform, which rolls the fleet; a rotation Lambda could not restart the servers.
  count                   = local.own_tls ? 0 : 1
  name_prefix             = "${var.name}/gpu-server/tls-key-"
  description             = "PEM private key of the gpu-servers' certificate."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "tls_key" {
  count         = local.own_tls ? 0 : 1
  secret_id     = aws_secretsmanager_secret.tls_key[0].id
  secret_string = tls_private_key.server[0].private_key_pem_pkcs8
}

# --- IAM and logs (modules/instance-role) ------------------------------

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.server_secret_arn, var.lease_public_key_secret_arn, var.balancer_ca_secret_arn, var.balancer_client_tls.cert, var.balancer_client_tls.key, local.tls_cert, local.tls_key]
  }
}

module "role" {
  source             = "../instance-role"
  name_prefix        = "${var.name}-gpu-server-"
  kms_key_arn        = var.kms_key_arn
  log_group_name     = local.log_group
  log_retention_days = var.log_retention_days
  binary_arn         = "arn:${local.partition}:s3:::${var.artifact_bucket}/${var.binary_key}"
  policy_json        = data.aws_iam_policy_document.this.json
}

# --- boot configuration ----------------------------------------------------

locals {
  mig_env = join("", [
    "GPUPOOL_MIG_PROFILES=\"${join(" ", [for name, p in local.profiles : "${name}:${p.id}:${p.memory_slices}:${join("/", p.starts)}"])}\"\n",
    "GPUPOOL_MIG_LAYOUT=${join(",", var.mig_layout)}\n",
  ])

  server_env = join("", [for k, v in {
    GPUPOOL_INFRA_REGION            = local.region
    GPUPOOL_INFRA_BUCKET            = var.artifact_bucket
    GPUPOOL_INFRA_BINARY_KEY        = var.binary_key
    GPUPOOL_INFRA_BINARY_VERSION    = var.binary_version
    GPUPOOL_INFRA_SERVER_SECRET     = var.server_secret_arn
    GPUPOOL_INFRA_PUBLIC_KEY_SECRET = var.lease_public_key_secret_arn
    GPUPOOL_INFRA_TLS_CERT_SECRET   = local.tls_cert
    GPUPOOL_INFRA_TLS_KEY_SECRET    = local.tls_key
    GPUPOOL_INFRA_BALANCER_CA       = var.balancer_ca_secret_arn
    GPUPOOL_INFRA_CLIENT_CERT       = var.balancer_client_tls.cert
    GPUPOOL_INFRA_CLIENT_KEY        = var.balancer_client_tls.key
    # Not read by anything: a renewed certificate changes the launch template, so
    # the instance refresh rolls it out.
    GPUPOOL_INFRA_TLS_CERT_SHA256 = local.own_tls ? "" : sha256(tls_self_signed_cert.server[0].cert_pem)
    GPUPOOL_LISTEN                = "0.0.0.0:${var.quic_port}"
    GPUPOOL_WORKER_PORTS          = "${var.worker_ports[0]}-${var.worker_ports[1]}"
    GPUPOOL_DEVICE                = "auto"
    GPUPOOL_INSTANCES             = "nvml"
    GPUPOOL_MIG_LAYOUT            = join(",", var.mig_layout)
    GPUPOOL_BALANCER              = var.balancer_url
    GPUPOOL_IMAGE_CACHE           = "/var/lib/gpupool/images"
    GPUPOOL_SESSION_MEMORY_MIB    = var.session_memory_mib == null ? "" : tostring(var.session_memory_mib)
    GPUPOOL_METRICS_LISTEN        = var.metrics_port == null ? "" : "0.0.0.0:${var.metrics_port}"
    GPUPOOL_STAGING_HOST_MIB      = var.staging_host_mib == null ? "" : tostring(var.staging_host_mib)
    GPUPOOL_SWAP_HOST_MIB         = var.swap_host_mib > 0 ? tostring(var.swap_host_mib) : ""
    GPUPOOL_SWAP_DISK_MIB         = var.swap_host_mib > 0 && var.swap_disk_mib > 0 ? tostring(var.swap_disk_mib) : ""
    GPUPOOL_SWAP_DIR              = var.swap_host_mib > 0 && var.swap_disk_mib > 0 ? "/var/lib/gpupool/swap" : ""
  } : "${k}=${v}\n" if v != ""])

  agent = jsonencode({
    agent = { run_as_user = "root" }
    logs = {
      logs_collected = {
        files = {
          collect_list = [for f in ["server", "mig", "boot"] : {
            file_path       = "/var/log/gpupool/${f}.log"
            log_group_name  = local.log_group
            log_stream_name = "{instance_id}/${f}"
          }]
        }
      }
    }
  })

  # The CloudWatch agent package comes from its regional S3 bucket, reached
  # through the VPC's S3 gateway endpoint (the hosts have no internet route).
  agent_deb = "https://amazoncloudwatch-agent-${local.region}.s3.${local.region}.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb"

  user_data = join("\n", ["#cloud-config", yamlencode({
    write_files = [
      { path = "/etc/gpupool/mig.env", permissions = "0644", content = local.mig_env },
      { path = "/etc/gpupool/server.env", permissions = "0644", content = local.server_env },
      { path = "/usr/local/lib/gpupool/gpupool-mig", permissions = "0755", content = file("${path.module}/files/gpupool-mig.sh") },
      { path = "/usr/local/lib/gpupool/start-server.sh", permissions = "0755", content = file("${path.module}/files/start-server.sh") },
      { path = "/etc/systemd/system/gpupool-mig.service", permissions = "0644", content = file("${path.module}/files/gpupool-mig.service") },
      { path = "/etc/systemd/system/gpupool-server.service", permissions = "0644", content = file("${path.module}/files/gpupool-server.service") },
      { path = local.agent_conf, permissions = "0644", content = local.agent },
      { path = "/etc/logrotate.d/gpupool", permissions = "0644", content = "/var/log/gpupool/*.log {\n  daily\n  rotate 7\n  compress\n  missingok\n  copytruncate\n}\n" },
    ]
    runcmd = [
      ["mkdir", "-p", "/var/log/gpupool", "/var/lib/gpupool"],
      ["install", "-d", "-m", "0700", "/var/lib/gpupool/swap"],
      ["sh", "-c", "test -x /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl || { curl -sfo /tmp/cwagent.deb ${local.agent_deb} && dpkg -i /tmp/cwagent.deb; } >>/var/log/gpupool/boot.log 2>&1"],
      ["/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl", "-a", "fetch-config", "-m", "ec2", "-s", "-c", "file:${local.agent_conf}"],
      ["systemctl", "daemon-reload"],
      ["systemctl", "enable", "gpupool-mig.service", "gpupool-server.service"],
      # First boot: start both now (gpupool-mig may reboot the host once to
      # enable MIG mode; from then on systemd starts them at every boot).
      ["systemctl", "start", "--no-block", "gpupool-server.service"],
    ]
  })])
}

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-gpu-server-"
  description            = "gpupool gpu-server on ${var.instance_type}, MIG layout ${join(",", var.mig_layout)}"
  image_id               = nonsensitive(data.aws_ssm_parameter.ami.value)
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64gzip(local.user_data)
  vpc_security_group_ids = [var.security_group_id]

  iam_instance_profile {
    arn = module.role.instance_profile_arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/sda1"
    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_gib
      encrypted             = true
      kms_key_id            = var.kms_key_arn
      delete_on_termination = true
    }
  }

  dynamic "capacity_reservation_specification" {
    for_each = var.capacity_reservation_id == null ? [] : [var.capacity_reservation_id]
    content {
      capacity_reservation_target {
        capacity_reservation_id = capacity_reservation_specification.value
      }
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = "${var.name}-gpu-server" }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = { Name = "${var.name}-gpu-server" }
  }

  lifecycle {
    precondition {
      condition     = local.model != null
      error_message = "instance_type ${var.instance_type} has no MIG profile table in mig-profiles.json."
    }
  }

  depends_on = [module.role]
}

resource "aws_autoscaling_group" "this" {
  name_prefix               = "${var.name}-gpu-server-"
  vpc_zone_identifier       = var.subnet_ids
  desired_capacity          = var.server_count
  min_size                  = var.server_count
  max_size                  = var.server_count
  health_check_type         = "EC2"
  health_check_grace_period = 900
  # A first boot installs the agent, may reboot once for MIG mode and then
  # registers with the balancer: give it time before counting it in service.
  default_instance_warmup = 900

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  # A new binary, layout or AMI changes the launch template: replace servers
  # one batch at a time, keeping half the fleet serving.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
      instance_warmup        = 900
    }
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-gpu-server"
    propagate_at_launch = true
  }
}
