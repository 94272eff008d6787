variable "region" {
  description = "AWS region to deploy the pool in."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Name of the pool: prefix of every resource name."
  type        = string
  default     = "gpupool"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2 to 21 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "availability_zones" {
  description = "Availability zones of the private subnets (list the zones where you have GPU capacity)."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b"]
}

variable "vpc_cidr" {
  description = "CIDR block of the pool's VPC."
  type        = string
  default     = "10.40.0.0/16"
}

variable "instance_type" {
  description = "GPU server instance type (MIG-capable: p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, p5en.48xlarge)."
  type        = string
  default     = "p5.48xlarge"
}

variable "mig_layout" {
  description = "MIG layout of every GPU, in the profile names of the instance type's GPU (README: MIG layout choices)."
  type        = list(string)
  default     = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
}

variable "gpu_server_count" {
  description = "Number of GPU servers (0: everything but the GPUs)."
  type        = number
  default     = 1
}

variable "capacity_reservation_id" {
  description = "On-demand capacity reservation (ODCR) id for the GPU servers, if any."
  type        = string
  default     = null
}

variable "balancer_policy" {
  description = "Balancer placement policy: spread or binpack."
  type        = string
  default     = "spread"
}

variable "balancer_quotas" {
  description = "Per-tenant quotas in the balancer's --quota syntax, e.g. [\"*=leases:8\"]."
  type        = list(string)
  default     = []
}

variable "lambda_tenant" {
  description = "Tenant the example function leases as (it gets a credential of its own, which the function presents)."
  type        = string
  default     = "example"
}

variable "tenants" {
  description = "Further tenants, each with its own credential in Secrets Manager (output tenant_secret_arns) and optionally its quota (\"leases:N,memory-gib:M\"; not also in balancer_quotas)."
  type = map(object({
    quota = optional(string)
  }))
  default = {}
}

variable "allow_shared_client_secret" {
  description = "Legacy: keep the one client secret shared by every client (it leases for any tenant) while clients move to their tenants' credentials."
  type        = bool
  default     = false
}

variable "lambda_architecture" {
  description = "Lambda architecture of the layer and the example function: x86_64 or arm64 (build with ARCH=arm64 bash infra/build-artifacts.sh for arm64)."
  type        = string
  default     = "x86_64"
  validation {
    condition     = contains(["x86_64", "arm64"], var.lambda_architecture)
    error_message = "lambda_architecture must be x86_64 or arm64."
  }
}

variable "lambda_image_uri" {
  description = "ECR URI of a container image for the example function instead of the zip (e.g. the PyTorch example: lambda-layer/python/torch/build-image.sh, then docker push); null: the zip."
  type        = string
  default     = null
}

variable "lambda_max_concurrency" {
  description = "Reserved concurrency of the example function (each environment holds one lease)."
  type        = number
  default     = 8
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps every log group of the pool."
  type        = number
  default     = 365
  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a retention CloudWatch Logs offers (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653)."
  }
}

variable "artifacts_dir" {
  description = "Directory with the built artifacts (bash infra/build-artifacts.sh). Null: target/infra of this repository."
  type        = string
  default     = null
}

variable "metrics_port" {
  description = "TCP port of the gpu-servers' and the balancer's Prometheus endpoints (infra/monitoring/); null: off. Attach the output monitoring_security_group_id to the Prometheus host."
  type        = number
  default     = 9464
}

variable "monitoring" {
  description = "The monitoring host (modules/monitoring; needs metrics_port): Prometheus and Grafana on one private instance, off until enabled (its releases must be pinned first: python3 infra/fetch-monitoring.py --pin). allowed_cidrs (null: the VPC's CIDR) may reach Prometheus (9090) and Grafana (3000); volume_size_gib holds Prometheus' samples for retention. Its releases are pinned in infra/monitoring/releases.json."
  type = object({
    enabled         = optional(bool, false)
    instance_type   = optional(string, "t3.small")
    allowed_cidrs   = optional(list(string))
    volume_size_gib = optional(number, 30)
    retention       = optional(string, "30d")
  })
  default = {}
}
