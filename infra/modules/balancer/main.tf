# The balancer: one small EC2 instance in a private subnet, at a fixed private
# address, run by systemd.
#
# Why an instance and not ECS: the balancer is one process with its state in
# memory (it recovers live leases from the servers after a restart), so a
# service scheduler adds nothing that EC2 auto-recovery and systemd's restart
# do not give; ECS would also need an image registry and an image build that
# the repository does not have, and the binary already runs the same way on
# the GPU hosts. A fixed address (host number of the subnet) keeps the URL
# that servers and functions are configured with when the instance is
# replaced, without a load balancer's hourly cost.

data "aws_region" "current" {}
data "aws_partition" "current" {}

data "aws_subnet" "this" {
  id = var.subnet_id
}

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

locals {
  region     = data.aws_region.current.name
  partition  = data.aws_partition.current.partition
  address    = cidrhost(data.aws_subnet.this.cidr_block, var.host_number)
  url        = "https://${local.address}:${var.port}"
  log_group  = "/${var.name}/balancer"
  agent_conf = "/opt/aws/amazon-cloudwatch-agent/etc/gpupool.json"
}

# --- secrets ---------------------------------------------------------------

resource "random_password" "server" {
  length  = 48
  special = false
}

# Legacy: one secret shared by every client, which then leases for any
# tenant. Kept only while var.allow_shared_client_secret is set (migration
# to per-tenant credentials); the moved blocks keep an existing deployment's
# secret (and its value) when it turns the flag on.
resource "random_password" "client" {
  count   = var.allow_shared_client_secret ? 1 : 0
  length  = 48
  special = false
}

moved {
  from = random_password.client
  to   = random_password.client[0]
}

# Each tenant's own credential: the tenant of a client request is the one
# its credential belongs to. 48 random letters and digits (~285 bits), so
# the balancer may keep a plain SHA-256 of it (docs/balancer.md).
resource "random_password" "tenant" {
  for_each = var.tenants
  length   = 48
  special  = false
}

resource "aws_secretsmanager_secret" "signing_key" {
  #checkov:skip=CKV2_AWS_57:Rotating the lease-signing key invalidates every live lease and needs every gpu-server restarted with the new public key; it is rotated by hand (infra/README.md), not by a rotation Lambda.
  name_prefix             = "${var.name}/balancer/lease-signing-key-"
  description             = "gpupool balancer's ed25519 lease-signing key (hex seed). Created by the balancer on its first start."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret" "public_key" {
  #checkov:skip=CKV2_AWS_57:Not a credential: the public half of the signing key, written by the balancer itself whenever the key changes.
  name_prefix             = "${var.name}/balancer/lease-public-key-"
  description             = "Public key of the lease-signing key (what gpu-servers take as --lease-key). Written by the balancer."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret" "server" {
  #checkov:skip=CKV2_AWS_57:Shared by the balancer and every gpu-server, which read it at start; rotating means a new Terraform value and a rolling restart (infra/README.md), which a rotation Lambda cannot coordinate.
  name_prefix             = "${var.name}/balancer/server-secret-"
  description             = "Secret gpu-servers present to register with the balancer."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "server" {
  secret_id     = aws_secretsmanager_secret.server.id
  secret_string = random_password.server.result
}

resource "aws_secretsmanager_secret" "client" {
  #checkov:skip=CKV2_AWS_57:Legacy, kept only during a migration to per-tenant credentials; shared by the balancer and the clients' configuration, which a rotation Lambda cannot coordinate.
  count                   = var.allow_shared_client_secret ? 1 : 0
  name_prefix             = "${var.name}/balancer/client-secret-"
  description             = "Legacy secret shared by every client (leases for any tenant); only while clients move to per-tenant credentials."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

moved {
  from = aws_secretsmanager_secret.client
  to   = aws_secretsmanager_secret.client[0]
}

resource "aws_secretsmanager_secret_version" "client" {
  count         = var.allow_shared_client_secret ? 1 : 0
  secret_id     = aws_secretsmanager_secret.client[0].id
  secret_string = random_password.client[0].result
}

moved {
  from = aws_secretsmanager_secret_version.client
  to   = aws_secretsmanager_secret_version.client[0]
}

resource "aws_secretsmanager_secret" "tenant" {
  #checkov:skip=CKV2_AWS_57:Rotated by adding a second credential for the tenant (the tenants file takes several), moving its clients, then removing the first (infra/README.md); a rotation Lambda cannot update the balancer's tenants file and the clients together.
  for_each                = var.tenants
  name_prefix             = "${var.name}/balancer/tenant-${each.key}-"
  description             = "Credential of tenant ${each.key} (its GPUPOOL_BALANCER_SECRET): the balancer takes the tenant from it."
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "tenant" {
  for_each      = var.tenants
  secret_id     = aws_secretsmanager_secret.tenant[each.key].id
  secret_string = random_password.tenant[each.key].result
}

locals {
  # The balancer's tenants file: each tenant's name, the SHA-256 of its
  # credential (Terraform's sha256 is hex of the UTF-8 bytes, as the
  # balancer computes it) and its quota. Digests only: nothing in it can be
  # presented as a credential, so it travels in the user data.
  tenants_file = join("", [for t, v in var.tenants : "${t} sha256:${sha256(random_password.tenant[t].result)}${v.quota == null ? "" : " ${v.quota}"}\n"])
}

# --- TLS for the gRPC service ------------------------------------------
# A pool CA (its key stays in the Terraform state) signs the balancer's
# certificate for its fixed address and the gpu-servers' client certificate. The balancer reads its certificate and
# key from Secrets Manager at each start (to /run, tmpfs); gpu-servers read
# the CA certificate from its secret, and the Lambda function gets it in its
# environment (GPUPOOL_BALANCER_CA_PEM). Renewed by Terraform at the first
# apply within 60 days of expiry, which replaces the instance.

resource "tls_private_key" "ca" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  private_key_pem       = tls_private_key.ca.private_key_pem
  is_ca_certificate     = true
  validity_period_hours = 24 * 365 * 5
  early_renewal_hours   = 24 * 60
  allowed_uses          = ["cert_signing", "crl_signing"]
  subject {
    common_name  = "${var.name} gpupool balancer CA"
    organization = var.name
  }
}

# What the CA issues: the balancer's certificate for its fixed address, and
# the client certificate the gpu-servers present (the balancer runs with
# --server-client-ca and takes registrations and heartbeats only from a
# holder of it, besides the server secret).
locals {
  issued = {
    balancer = {
      common_name  = "gpupool-balancer"
      dns_names    = ["gpupool-balancer", "localhost"]
      ip_addresses = [local.address]
      uses         = ["digital_signature", "server_auth"]
    }
    server_client = {
      common_name  = "gpupool-server"
      dns_names    = []
      ip_addresses = []
      uses         = ["digital_signature", "client_auth"]
    }
  }
}

resource "tls_private_key" "issued" {
  for_each    = local.issued
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "issued" {
  for_each        = local.issued
  private_key_pem = tls_private_key.issued[each.key].private_key_pem
  dns_names       = each.value.dns_names
  ip_addresses    = each.value.ip_addresses
  subject {
    common_name  = each.value.common_name
    organization = var.name
  }
}

resource "tls_locally_signed_cert" "issued" {
  for_each              = local.issued
  cert_request_pem      = tls_cert_request.issued[each.key].cert_request_pem
  ca_private_key_pem    = tls_private_key.ca.private_key_pem
  ca_cert_pem           = tls_self_signed_cert.ca.cert_pem
  validity_period_hours = 24 * 365 * 2
  early_renewal_hours   = 24 * 60
  allowed_uses          = each.value.uses
}

locals {
  # The TLS secrets: what each holds.
  tls_secrets = {
    cert        = "PEM certificate of the balancer's gRPC service."
    key         = "PEM private key of the balancer's gRPC certificate."
    ca          = "PEM CA certificate clients verify the balancer's gRPC certificate with (not a credential)."
    client-cert = "PEM client certificate the gpu-servers present to the balancer."
    client-key  = "PEM private key of the gpu-servers' client certificate."
  }
  tls_values = {
    cert        = tls_locally_signed_cert.issued["balancer"].cert_pem
    key         = tls_private_key.issued["balancer"].private_key_pem_pkcs8
    ca          = tls_self_signed_cert.ca.cert_pem
    client-cert = tls_locally_signed_cert.issued["server_client"].cert_pem
    client-key  = tls_private_key.issued["server_client"].private_key_pem_pkcs8
  }
}

resource "aws_secretsmanager_secret" "tls" {
  #checkov:skip=CKV2_AWS_57:Renewed by Terraform (a new certificate at the first apply within 60 days of expiry), which replaces the balancer instance and updates the servers' and functions' CA; a rotation Lambda could not restart them.
  for_each                = local.tls_secrets
  name_prefix             = "${var.name}/balancer/tls-${each.key}-"
  description             = each.value
  kms_key_id              = var.kms_key_arn
  recovery_window_in_days = 0
}

resource "aws_secretsmanager_secret_version" "tls" {
  for_each      = local.tls_secrets
  secret_id     = aws_secretsmanager_secret.tls[each.key].id
  secret_string = local.tls_values[each.key]
}

# --- IAM and logs (modules/instance-role) ------------------------------

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:ListSecretVersionIds"]
    resources = concat([aws_secretsmanager_secret.signing_key.arn, aws_secretsmanager_secret.public_key.arn, aws_secretsmanager_secret.server.arn, aws_secretsmanager_secret.tls["cert"].arn, aws_secretsmanager_secret.tls["key"].arn, aws_secretsmanager_secret.tls["ca"].arn], aws_secretsmanager_secret.client[*].arn)
  }
  statement {
    sid       = "StoreItsOwnKeys"
    actions   = ["secretsmanager:PutSecretValue"]
    resources = [aws_secretsmanager_secret.signing_key.arn, aws_secretsmanager_secret.public_key.arn]
  }
}

module "role" {
  source             = "../instance-role"
  name_prefix        = "${var.name}-balancer-"
  kms_key_arn        = var.kms_key_arn
  kms_actions        = ["kms:Decrypt", "kms:GenerateDataKey"]
  log_group_name     = local.log_group
  log_retention_days = var.log_retention_days
  binary_arn         = "arn:${local.partition}:s3:::${var.artifact_bucket}/${var.binary_key}"
  policy_json        = data.aws_iam_policy_document.this.json
}

# --- the instance ----------------------------------------------------------

locals {
  env = join("", [for k, v in {
    GPUPOOL_INFRA_REGION              = local.region
    GPUPOOL_INFRA_BUCKET              = var.artifact_bucket
    GPUPOOL_INFRA_BINARY_KEY          = var.binary_key
    GPUPOOL_INFRA_BINARY_VERSION      = var.binary_version
    GPUPOOL_INFRA_SIGNING_KEY_SECRET  = aws_secretsmanager_secret.signing_key.arn
    GPUPOOL_INFRA_PUBLIC_KEY_SECRET   = aws_secretsmanager_secret.public_key.arn
    GPUPOOL_INFRA_SERVER_SECRET       = aws_secretsmanager_secret.server.arn
    GPUPOOL_INFRA_CLIENT_SECRET       = join("", aws_secretsmanager_secret.client[*].arn)
    GPUPOOL_TENANTS_FILE              = "/etc/gpupool/tenants"
    GPUPOOL_INFRA_TLS_CERT_SECRET     = aws_secretsmanager_secret.tls["cert"].arn
    GPUPOOL_INFRA_TLS_KEY_SECRET      = aws_secretsmanager_secret.tls["key"].arn
    GPUPOOL_INFRA_TLS_CA_SECRET       = aws_secretsmanager_secret.tls["ca"].arn
    GPUPOOL_LISTEN                    = "0.0.0.0:${var.port}"
    GPUPOOL_POLICY                    = var.policy
    GPUPOOL_MEMORY_OVERCOMMIT_PERCENT = var.memory_overcommit_percent == 100 ? "" : tostring(var.memory_overcommit_percent)
    GPUPOOL_MIG_POLICY                = var.mig_policy
    GPUPOOL_REBALANCE_INTERVAL_MS     = tostring(var.rebalance_interval_ms)
    GPUPOOL_QUOTAS                    = join(";", var.quotas)
    GPUPOOL_METRICS_LISTEN            = var.metrics_port == null ? "" : "0.0.0.0:${var.metrics_port}"
  } : "${k}=${v}\n" if v != ""])

  agent = jsonencode({
    agent = { run_as_user = "root" }
    logs = {
      logs_collected = {
        files = {
          collect_list = [{
            file_path       = "/var/log/gpupool/balancer.log"
            log_group_name  = local.log_group
            log_stream_name = "{instance_id}"
          }]
        }
      }
    }
  })

  user_data = join("\n", ["#cloud-config", yamlencode({
    write_files = [
      { path = "/etc/gpupool/balancer.env", permissions = "0644", content = local.env },
      { path = "/etc/gpupool/tenants", permissions = "0644", content = local.tenants_file },
      { path = "/usr/local/lib/gpupool/start-balancer.sh", permissions = "0755", content = file("${path.module}/files/start-balancer.sh") },
      { path = "/etc/systemd/system/gpupool-balancer.service", permissions = "0644", content = file("${path.module}/files/gpupool-balancer.service") },
      { path = local.agent_conf, permissions = "0644", content = local.agent },
      { path = "/etc/logrotate.d/gpupool", permissions = "0644", content = "/var/log/gpupool/*.log {\n  daily\n  rotate 7\n  compress\n  missingok\n  copytruncate\n}\n" },
    ]
    runcmd = [
      ["mkdir", "-p", "/var/log/gpupool"],
      # Amazon Linux's package mirrors are S3 buckets: reached through the VPC's S3 gateway endpoint.
      ["dnf", "install", "-y", "amazon-cloudwatch-agent"],
      ["/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl", "-a", "fetch-config", "-m", "ec2", "-s", "-c", "file:${local.agent_conf}"],
      ["systemctl", "daemon-reload"],
      ["systemctl", "enable", "--now", "gpupool-balancer.service"],
    ]
  })])
}

resource "aws_instance" "this" {
  ami                     = nonsensitive(data.aws_ssm_parameter.al2023.value)
  instance_type           = var.instance_type
  subnet_id               = var.subnet_id
  private_ip              = local.address
  vpc_security_group_ids  = [var.security_group_id]
  iam_instance_profile    = module.role.instance_profile_name
  monitoring              = true
  ebs_optimized           = true
  disable_api_termination = false
  user_data_base64        = base64gzip(local.user_data)
  # A new binary or setting rewrites the user data: replace the instance, which
  # comes back at the same address with the same signing key.
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = 16
    encrypted             = true
    kms_key_id            = var.kms_key_arn
    delete_on_termination = true
  }

  maintenance_options {
    auto_recovery = "default"
  }

  tags = { Name = "${var.name}-balancer" }

  lifecycle {
    # A newer Amazon Linux image alone does not replace a running balancer;
    # `terraform apply -replace=module.balancer.aws_instance.this` does.
    ignore_changes = [ami]
    precondition {
      condition     = length(var.tenants) > 0 || var.allow_shared_client_secret
      error_message = "No client could lease: give the tenants (var.tenants), or allow_shared_client_secret while clients migrate."
    }
  }

  depends_on = [aws_secretsmanager_secret_version.server, aws_secretsmanager_secret_version.client, aws_secretsmanager_secret_version.tenant, aws_secretsmanager_secret_version.tls, module.role]
}
