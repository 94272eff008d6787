variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "artifacts" {
  description = "Local files to upload to the artifact bucket, by object key (e.g. \"bin/gpupool-server\" = \"../../../target/release/gpupool-server\"). Instances fetch them at boot."
  type        = map(string)
  validation {
    condition     = alltrue([for path in values(var.artifacts) : fileexists(path)])
    error_message = "An artifact file is missing. Build them first: bash infra/build-artifacts.sh (see infra/README.md)."
  }
}

variable "noncurrent_artifact_days" {
  description = "Days an overwritten artifact version is kept (for rolling back) before S3 deletes it."
  type        = number
  default     = 30
  validation {
    condition     = var.noncurrent_artifact_days >= 1
    error_message = "noncurrent_artifact_days must be at least 1."
  }
}
