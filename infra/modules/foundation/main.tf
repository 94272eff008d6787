# What every other module builds on: one customer-managed KMS key for the
# pool (EBS volumes, secrets, log groups, artifacts, Lambda environment) and
# the artifact bucket that GPU servers and the balancer fetch their binaries
# from at boot.

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

locals {
  account   = data.aws_caller_identity.current.account_id
  region    = data.aws_region.current.name
  partition = data.aws_partition.current.partition
  # The Auto Scaling service-linked role launches the GPU servers, so it must be
  # able to use the key for their encrypted volumes (it exists once the account
  # has used Auto Scaling; README: prerequisites).
  autoscaling_role = "arn:${local.partition}:iam::${local.account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
}

resource "aws_kms_key" "pool" {
  description             = "${var.name}: EBS, secrets, logs, artifacts and Lambda environment of the GPU pool"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  # A key policy's "Resource": "*" means this key. Principals of the account get
  # the key through their IAM policies (each role below names this key's ARN);
  # AWS services that act for no role of ours get their own statements.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministersThroughIam"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsEncryptsThisPoolsLogGroups"
        Effect    = "Allow"
        Principal = { Service = "logs.${local.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = [
              "arn:${local.partition}:logs:${local.region}:${local.account}:log-group:/${var.name}/*",
              "arn:${local.partition}:logs:${local.region}:${local.account}:log-group:/aws/lambda/${var.name}-*",
            ]
          }
        }
      },
      {
        Sid       = "AutoScalingUsesTheKeyForVolumes"
        Effect    = "Allow"
        Principal = { AWS = local.autoscaling_role }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
        Resource  = "*"
      },
      {
        Sid       = "AutoScalingGrantsVolumeAttachment"
        Effect    = "Allow"
        Principal = { AWS = local.autoscaling_role }
        Action    = "kms:CreateGrant"
        Resource  = "*"
        Condition = { Bool = { "kms:GrantIsForAWSResource" = "true" } }
      },
    ]
  })
}

resource "aws_kms_alias" "pool" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.pool.key_id
}

# Artifact bucket: binaries the instances download at boot. Written by
# Terraform only, read by the pool's instance roles only.
resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_18:Only Terraform writes and only the pool's two instance roles read; CloudTrail S3 data events are the audit trail, and an access-log bucket would need its own log bucket.
  #checkov:skip=CKV_AWS_144:Artifacts are rebuilt from the repository at any time; a replica in another region holds nothing that cannot be rebuilt.
  #checkov:skip=CKV2_AWS_62:Nothing consumes upload events: instances fetch artifacts at boot and launch-template changes roll the fleet.
  bucket_prefix = "${var.name}-artifacts-"
  force_destroy = true
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    bucket_key_enabled = true
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.pool.arn
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    id     = "expire-old-artifact-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_artifact_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
  depends_on = [aws_s3_bucket_versioning.artifacts]
}

data "aws_iam_policy_document" "artifacts_tls_only" {
  statement {
    sid       = "DenyPlainHttp"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket     = aws_s3_bucket.artifacts.id
  policy     = data.aws_iam_policy_document.artifacts_tls_only.json
  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

resource "aws_s3_object" "artifact" {
  for_each           = var.artifacts
  bucket             = aws_s3_bucket.artifacts.id
  key                = each.key
  source             = each.value
  source_hash        = filemd5(each.value)
  kms_key_id         = aws_kms_key.pool.arn
  bucket_key_enabled = true
  depends_on         = [aws_s3_bucket_server_side_encryption_configuration.artifacts]
}
