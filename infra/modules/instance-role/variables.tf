variable "name_prefix" {
  description = "Prefix of the role's and instance profile's names."
  type        = string
}

variable "kms_key_arn" {
  description = "The pool's KMS key, which the instance uses through S3 and Secrets Manager only."
  type        = string
}

variable "kms_actions" {
  description = "KMS actions the instance needs on the key (through S3 and Secrets Manager)."
  type        = list(string)
  default     = ["kms:Decrypt"]
}

variable "log_group_name" {
  description = "Name of the instance's log group (created here, encrypted with the pool's key)."
  type        = string
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the log."
  type        = number
}

variable "binary_arn" {
  description = "ARN of the one artifact object (the binary) the instance fetches at boot."
  type        = string
}

variable "policy_json" {
  description = "The instance's own statements (its secrets), as an IAM policy document."
  type        = string
}
