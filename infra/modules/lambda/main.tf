# The Lambda side: the gpupool layer (the drop-in libcuda.so.1 and
# libnvidia-ml.so.1 under /opt/lib, and the extension that leases a GPU during
# INIT) and the example function, attached to the pool's VPC through the
# client security group. It needs no route to the internet: it talks to the
# balancer (gRPC) and the gpu-servers (QUIC) only, and Lambda delivers its
# logs itself.

data "aws_region" "current" {}
data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  function_name = "${var.name}-example"
  account       = data.aws_caller_identity.current.account_id
  region        = data.aws_region.current.name
  partition     = data.aws_partition.current.partition
  arn_prefix    = "arn:${local.partition}:ec2:${local.region}:${local.account}"

  # A container-image function (image_uri) instead of the zip and the layer;
  # PyTorch alone takes over 1 GB of memory once imported.
  image       = var.image_uri != null
  memory_size = local.image ? 4096 : 1024
}

resource "aws_lambda_layer_version" "gpupool" {
  layer_name               = "${var.name}-gpupool"
  description              = "gpupool: drop-in libcuda.so.1 and libnvidia-ml.so.1, and the lease extension"
  filename                 = var.layer_zip
  source_code_hash         = filebase64sha256(var.layer_zip)
  compatible_runtimes      = ["provided.al2023"]
  compatible_architectures = [var.architecture]
}

resource "aws_cloudwatch_log_group" "function" {
  name              = "/aws/lambda/${local.function_name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "function" {
  name_prefix        = "${var.name}-example-fn-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

data "aws_iam_policy_document" "function" {
  statement {
    sid       = "WriteItsLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function.arn}:*"]
  }
  statement {
    # What Lambda needs to give the function network interfaces in the VPC.
    # Describe calls support no resource-level scoping.
    sid       = "DescribeNetworkInterfaces"
    actions   = ["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeVpcs"]
    resources = ["*"]
  }
  statement {
    sid     = "ManageItsNetworkInterfaces"
    actions = ["ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface", "ec2:AssignPrivateIpAddresses", "ec2:UnassignPrivateIpAddresses"]
    resources = concat(
      ["${local.arn_prefix}:network-interface/*", "${local.arn_prefix}:security-group/${var.security_group_id}"],
      [for s in var.subnet_ids : "${local.arn_prefix}:subnet/${s}"],
    )
  }
  statement {
    sid       = "DecryptItsEnvironment"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
  statement {
    # X-Ray segment uploads support no resource-level scoping.
    sid       = "Tracing"
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "function" {
  name   = "gpupool-example-function"
  role   = aws_iam_role.function.id
  policy = data.aws_iam_policy_document.function.json
}

resource "aws_lambda_function" "example" {
  #checkov:skip=CKV_AWS_116:Invoked synchronously (the caller gets the JSON result back); there are no asynchronous events whose failures a dead-letter queue would keep.
  #checkov:skip=CKV_AWS_272:The zip is built from this repository and uploaded by the same Terraform run that reviews it; code signing needs an AWS Signer profile and a signing step, which the example does not have yet.
  function_name    = local.function_name
  description      = local.image ? "gpupool example: a container-image function on a pooled GPU through the drop-in libcuda" : "gpupool example: matrix multiply on a pooled GPU through the drop-in libcuda"
  role             = aws_iam_role.function.arn
  package_type     = local.image ? "Image" : "Zip"
  image_uri        = var.image_uri
  runtime          = local.image ? null : "provided.al2023"
  architectures    = [var.architecture]
  handler          = local.image ? null : "bootstrap"
  filename         = var.function_zip
  source_code_hash = local.image ? null : filebase64sha256(var.function_zip)
  layers           = local.image ? null : [aws_lambda_layer_version.gpupool.arn]
  memory_size      = local.memory_size
  timeout          = var.timeout_seconds
  kms_key_arn      = var.kms_key_arn

  reserved_concurrent_executions = var.max_concurrency

  vpc_config {
    subnet_ids         = var.subnet_ids
    security_group_ids = [var.security_group_id]
  }

  environment {
    # No GPUPOOL_TENANT unless asked: the balancer takes the tenant from the
    # credential.
    variables = merge({
      GPUPOOL_BALANCER        = var.balancer_url
      GPUPOOL_LEASE_FILE      = "/tmp/gpupool/lease"
      GPUPOOL_MAX_UDP_PAYLOAD = "1200"
      GPUPOOL_BALANCER_SECRET = var.client_secret
      GPUPOOL_BALANCER_CA_PEM = var.balancer_ca_pem
      }, var.tenant == null ? {} : { GPUPOOL_TENANT = var.tenant },
    var.memory_mib == null ? {} : { GPUPOOL_MEMORY_MIB = tostring(var.memory_mib) })
  }

  tracing_config {
    mode = "Active"
  }

  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.function.name
  }

  depends_on = [aws_iam_role_policy.function]
}
