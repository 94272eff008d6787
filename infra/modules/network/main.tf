# The pool's private network: a VPC with one private subnet per zone and no
# internet gateway or NAT. Instances reach AWS APIs through VPC endpoints (S3
# as a gateway endpoint; SSM, Secrets Manager and CloudWatch Logs as interface
# endpoints, and EC2 for Prometheus' service discovery while metrics are on),
# and Lambda reaches nothing but the pool. Security groups:
# - client: Lambda functions (and any other client given this group); may
#   send QUIC (UDP) to gpu-servers and gRPC (TCP) to the balancer, nothing else;
# - gpu_server: accepts QUIC only from clients; may call the balancer and the
#   endpoints;
# - balancer: accepts gRPC only from clients and gpu-servers; may call the
#   endpoints;
# - monitoring: Prometheus (modules/monitoring, or the operator's own host);
#   may scrape the gpu-servers' and the balancer's metrics port and call the
#   endpoints;
# - endpoints: accepts HTTPS only from gpu-servers, the balancer and
#   monitoring.

data "aws_region" "current" {}

locals {
  region = data.aws_region.current.name
  # Session Manager needs the three ssm* endpoints; secretsmanager serves the
  # pool's secrets and logs the CloudWatch agent. Prometheus finds the
  # gpu-servers through the EC2 API (ec2_sd_configs), so ec2 comes with the
  # metrics endpoints.
  interface_endpoints = toset(concat(["ssm", "ssmmessages", "ec2messages", "secretsmanager", "logs"], var.metrics_port == null ? [] : ["ec2"]))
  # Instances that call AWS APIs: through the interface endpoints and S3's
  # gateway endpoint.
  api_callers = {
    gpu_server = aws_security_group.gpu_server.id
    balancer   = aws_security_group.balancer.id
    monitoring = aws_security_group.monitoring.id
  }
  subnet_bits = 2
}

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = var.name }
}

# The default security group of the VPC allows nothing; every resource here
# gets one of the groups below.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = "${var.name}-default-unused" }
}

resource "aws_subnet" "private" {
  count                   = length(var.availability_zones)
  vpc_id                  = aws_vpc.this.id
  availability_zone       = var.availability_zones[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, local.subnet_bits, count.index)
  map_public_ip_on_launch = false
  tags                    = { Name = "${var.name}-private-${var.availability_zones[count.index]}" }
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = "${var.name}-private" }
}

resource "aws_route_table_association" "private" {
  count          = length(aws_subnet.private)
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private.id
}

# --- flow logs -------------------------------------------------------------

resource "aws_cloudwatch_log_group" "flow" {
  name              = "/${var.name}/vpc-flow"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

data "aws_iam_policy_document" "flow_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "flow" {
  name_prefix        = "${var.name}-flow-"
  assume_role_policy = data.aws_iam_policy_document.flow_assume.json
}

data "aws_iam_policy_document" "flow" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow.id
  policy = data.aws_iam_policy_document.flow.json
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow.arn
  iam_role_arn    = aws_iam_role.flow.arn
}

# --- security groups -------------------------------------------------------

resource "aws_security_group" "client" {
  #checkov:skip=CKV2_AWS_5:Attached by the Lambda function (modules/lambda vpc_config) and any other client through this module's output; checkov does not follow the id across module boundaries.
  name_prefix = "${var.name}-client-"
  description = "gpupool clients (Lambda functions): may reach the gpu-servers (QUIC) and the balancer (gRPC) only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-client" }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "gpu_server" {
  #checkov:skip=CKV2_AWS_5:Attached by the gpu-servers' launch template (modules/gpu-fleet) through this module's output; checkov does not follow the id across module boundaries.
  name_prefix = "${var.name}-gpu-server-"
  description = "gpupool gpu-servers: QUIC from clients only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-gpu-server" }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "balancer" {
  #checkov:skip=CKV2_AWS_5:Attached by the balancer instance (modules/balancer) through this module's output; checkov does not follow the id across module boundaries.
  name_prefix = "${var.name}-balancer-"
  description = "gpupool balancer: gRPC from clients and gpu-servers only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-balancer" }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "endpoints" {
  name_prefix = "${var.name}-endpoints-"
  description = "VPC interface endpoints: HTTPS from the pool's instances only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-endpoints" }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "monitoring" {
  #checkov:skip=CKV2_AWS_5:Attached by the Prometheus host (modules/monitoring, or the operator's own) through this module's output monitoring_security_group_id; checkov does not follow the id across module boundaries.
  name_prefix = "${var.name}-monitoring-"
  description = "gpupool scrapers (Prometheus): may reach the gpu-servers' and the balancer's /metrics and the AWS API endpoints only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-monitoring" }
  lifecycle {
    create_before_destroy = true
  }
}

# Scrapers -> the gpu-servers' and the balancer's Prometheus endpoints,
# when they serve one (metrics_port).
locals {
  scraped = var.metrics_port == null ? {} : {
    gpu_server = aws_security_group.gpu_server.id
    balancer   = aws_security_group.balancer.id
  }
}

resource "aws_vpc_security_group_ingress_rule" "metrics_from_monitoring" {
  for_each                     = local.scraped
  security_group_id            = each.value
  description                  = "Prometheus scrapes (GET /metrics) from the monitoring group"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = aws_security_group.monitoring.id
}

resource "aws_vpc_security_group_egress_rule" "monitoring_scrapes" {
  for_each                     = local.scraped
  security_group_id            = aws_security_group.monitoring.id
  description                  = "Prometheus scrapes (GET /metrics) of the pool"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = each.value
}

# Clients -> gpu-servers: the QUIC listener and the session workers' ports.
resource "aws_vpc_security_group_ingress_rule" "gpu_quic_from_clients" {
  security_group_id            = aws_security_group.gpu_server.id
  description                  = "QUIC listener from gpupool clients"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = aws_security_group.client.id
}

resource "aws_vpc_security_group_ingress_rule" "gpu_workers_from_clients" {
  security_group_id            = aws_security_group.gpu_server.id
  description                  = "QUIC session workers from gpupool clients"
  ip_protocol                  = "udp"
  from_port                    = var.worker_ports[0]
  to_port                      = var.worker_ports[1]
  referenced_security_group_id = aws_security_group.client.id
}

resource "aws_vpc_security_group_egress_rule" "client_quic" {
  security_group_id            = aws_security_group.client.id
  description                  = "QUIC to the gpu-servers' listener"
  ip_protocol                  = "udp"
  from_port                    = var.quic_port
  to_port                      = var.quic_port
  referenced_security_group_id = aws_security_group.gpu_server.id
}

resource "aws_vpc_security_group_egress_rule" "client_workers" {
  security_group_id            = aws_security_group.client.id
  description                  = "QUIC to the gpu-servers' session workers"
  ip_protocol                  = "udp"
  from_port                    = var.worker_ports[0]
  to_port                      = var.worker_ports[1]
  referenced_security_group_id = aws_security_group.gpu_server.id
}

# Clients and gpu-servers -> balancer.
resource "aws_vpc_security_group_ingress_rule" "balancer_from_clients" {
  security_group_id            = aws_security_group.balancer.id
  description                  = "gRPC (leases) from gpupool clients"
  ip_protocol                  = "tcp"
  from_port                    = var.balancer_port
  to_port                      = var.balancer_port
  referenced_security_group_id = aws_security_group.client.id
}

resource "aws_vpc_security_group_ingress_rule" "balancer_from_gpu_servers" {
  security_group_id            = aws_security_group.balancer.id
  description                  = "gRPC (registration, heartbeats) from gpu-servers"
  ip_protocol                  = "tcp"
  from_port                    = var.balancer_port
  to_port                      = var.balancer_port
  referenced_security_group_id = aws_security_group.gpu_server.id
}

resource "aws_vpc_security_group_egress_rule" "client_balancer" {
  security_group_id            = aws_security_group.client.id
  description                  = "gRPC to the balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.balancer_port
  to_port                      = var.balancer_port
  referenced_security_group_id = aws_security_group.balancer.id
}

resource "aws_vpc_security_group_egress_rule" "gpu_balancer" {
  security_group_id            = aws_security_group.gpu_server.id
  description                  = "gRPC to the balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.balancer_port
  to_port                      = var.balancer_port
  referenced_security_group_id = aws_security_group.balancer.id
}

# Instances -> AWS APIs (interface endpoints, and S3 through its gateway endpoint).
resource "aws_vpc_security_group_ingress_rule" "endpoints_from_instances" {
  for_each                     = local.api_callers
  security_group_id            = aws_security_group.endpoints.id
  description                  = "HTTPS to AWS APIs from the ${each.key} instances"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "instances_to_endpoints" {
  for_each                     = local.api_callers
  security_group_id            = each.value
  description                  = "HTTPS to the VPC interface endpoints"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.endpoints.id
}

resource "aws_vpc_security_group_egress_rule" "instances_to_s3" {
  for_each          = local.api_callers
  security_group_id = each.value
  description       = "HTTPS to S3 through the gateway endpoint (artifacts, OS packages, CloudWatch agent)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = aws_vpc_endpoint.s3.prefix_list_id
}

# --- VPC endpoints ---------------------------------------------------------

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.this.id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = [aws_route_table.private.id]
  tags              = { Name = "${var.name}-s3" }
}

resource "aws_vpc_endpoint" "interface" {
  for_each            = local.interface_endpoints
  vpc_id              = aws_vpc.this.id
  service_name        = "com.amazonaws.${local.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = aws_subnet.private[*].id
  security_group_ids  = [aws_security_group.endpoints.id]
  tags                = { Name = "${var.name}-${each.key}" }
}
