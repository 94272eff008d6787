variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for the function's environment and log group."
  type        = string
}

variable "architecture" {
  description = "Instruction set of the layer and the function: x86_64 or arm64 (the zips must be built for it: ARCH=... bash infra/build-artifacts.sh)."
  type        = string
  default     = "x86_64"
  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64 (Lambda's two architectures)."
  }
}

variable "layer_zip" {
  description = "Path of the layer zip (bash lambda-layer/build.sh writes target/lambda-layer/gpupool-layer-ARCH.zip)."
  type        = string
  validation {
    condition     = fileexists(var.layer_zip)
    error_message = "The layer zip is missing: build it with bash infra/build-artifacts.sh (or bash lambda-layer/build.sh)."
  }
}

variable "function_zip" {
  description = "Path of the example function's zip (a single executable named bootstrap; bash infra/build-artifacts.sh writes target/infra/gpupool-lambda-example-ARCH.zip). null when image_uri is set."
  type        = string
  default     = null
  validation {
    condition     = var.function_zip == null || fileexists(coalesce(var.function_zip, "-"))
    error_message = "The function zip is missing: build it with bash infra/build-artifacts.sh."
  }
}

variable "image_uri" {
  description = "ECR URI of a container image to deploy the function from instead of function_zip (package type Image), e.g. the PyTorch example of lambda-layer/python/torch/build-image.sh. The image carries the layer's files itself, so no layer is attached (the layer is still published). null: the zip function."
  type        = string
  default     = null
  validation {
    condition     = (var.image_uri == null) != (var.function_zip == null)
    error_message = "Set exactly one of function_zip and image_uri."
  }
}

variable "subnet_ids" {
  description = "Private subnets the function's network interfaces go in."
  type        = list(string)
}

variable "security_group_id" {
  description = "The client security group (network module): reaches the gpu-servers and the balancer only."
  type        = string
}

variable "balancer_url" {
  description = "The balancer's gRPC URL."
  type        = string
}

variable "balancer_ca_pem" {
  description = "PEM CA certificate the function verifies the balancer's gRPC certificate with (balancer module's tls_ca_pem)."
  type        = string
}

variable "client_secret" {
  description = "The credential of the function's tenant (balancer module's tenant_secrets[tenant]; the balancer takes the tenant from it), or, while allowed, the legacy shared client secret. Stored in the function's environment, encrypted with the pool's key."
  type        = string
  sensitive   = true
}

variable "tenant" {
  description = "Tenant the example function names in its leases (GPUPOOL_TENANT). null: the credential's tenant, as the balancer takes it; set it only with the legacy shared secret."
  type        = string
  default     = null
  validation {
    condition     = var.tenant == null ? true : can(regex("^[A-Za-z0-9._-]{1,64}$", var.tenant))
    error_message = "tenant must be 1 to 64 letters, digits, dots, dashes or underscores."
  }
}

variable "memory_mib" {
  description = "Device memory the function leases, in MiB (null: the client's default)."
  type        = number
  default     = null
}

variable "max_concurrency" {
  description = "Reserved concurrency of the example function: each execution environment holds one lease, so keep it within the pool's instances."
  type        = number
  default     = 8
  validation {
    condition     = var.max_concurrency >= 1
    error_message = "max_concurrency must be at least 1."
  }
}

variable "timeout_seconds" {
  description = "Function timeout in seconds."
  type        = number
  default     = 60
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the function's logs."
  type        = number
  default     = 365
}
