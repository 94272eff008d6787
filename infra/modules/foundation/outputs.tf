output "kms_key_arn" {
  description = "ARN of the pool's KMS key."
  value       = aws_kms_key.pool.arn
}

output "artifact_bucket" {
  description = "Name of the artifact bucket."
  value       = aws_s3_bucket.artifacts.id
}

output "artifact_bucket_arn" {
  description = "ARN of the artifact bucket."
  value       = aws_s3_bucket.artifacts.arn
}

output "artifact_versions" {
  description = "Object key -> S3 version id of each uploaded artifact (instances fetch exactly these versions, and a new build changes the launch configuration)."
  value       = { for key, object in aws_s3_object.artifact : key => object.version_id }
}
