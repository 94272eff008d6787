variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for the volume, the secrets and the log group."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet the balancer runs in."
  type        = string
}

variable "security_group_id" {
  description = "Security group of the balancer (network module)."
  type        = string
}

variable "host_number" {
  description = "The balancer's fixed private address is this host number of its subnet, so it survives replacing the instance (servers and functions are configured with it)."
  type        = number
  default     = 10
  validation {
    condition     = var.host_number >= 4 && var.host_number <= 250
    error_message = "host_number must be between 4 and 250 (AWS reserves the first four addresses of a subnet)."
  }
}

variable "instance_type" {
  description = "Instance type of the balancer (a small burstable type is plenty: it holds the pool's state in memory and answers gRPC)."
  type        = string
  default     = "t3.small"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must be an EC2 instance type such as t3.small."
  }
}

variable "port" {
  description = "TCP port of the gRPC service."
  type        = number
  default     = 50051
}

variable "artifact_bucket" {
  description = "Artifact bucket holding the balancer binary."
  type        = string
}

variable "binary_key" {
  description = "Object key of the gpupool-balancer binary in the artifact bucket."
  type        = string
}

variable "binary_version" {
  description = "S3 version id of the binary (a new build replaces the instance's user data and restarts it)."
  type        = string
}

variable "policy" {
  description = "Placement policy: spread (least-loaded GPU first) or binpack (fill GPUs before using the next)."
  type        = string
  default     = "spread"
  validation {
    condition     = contains(["spread", "binpack"], var.policy)
    error_message = "policy must be spread or binpack."
  }
}

variable "memory_overcommit_percent" {
  description = "Shared leases of one whole GPU may together ask this many percent of its memory (100: no overcommit); only on gpu-servers that swap idle sessions out (gpu-fleet's swap_host_mib), by at most their swap space (docs/balancer.md, \"Memory overcommit\")."
  type        = number
  default     = 100
  validation {
    condition     = var.memory_overcommit_percent >= 100 && var.memory_overcommit_percent <= 1000
    error_message = "memory_overcommit_percent must be within 100-1000."
  }
}

variable "mig_policy" {
  description = "MIG layouts: static (as gpu-servers registered them) or dynamic (idle MIG GPUs laid out anew for requests that wait; docs/balancer.md, \"Dynamic layouts\")."
  type        = string
  default     = "static"
  validation {
    condition     = contains(["static", "dynamic"], var.mig_policy)
    error_message = "mig_policy must be static or dynamic."
  }
}

variable "rebalance_interval_ms" {
  description = "How often (ms) shared leases move off GPUs their servers report busy to idle ones, their sessions migrating (0: never; docs/balancer.md, \"Rebalancing\")."
  type        = number
  default     = 0
  validation {
    condition     = var.rebalance_interval_ms == 0 || (var.rebalance_interval_ms >= 1000 && var.rebalance_interval_ms <= 3600000)
    error_message = "rebalance_interval_ms must be 0 or within 1000-3600000."
  }
}

variable "quotas" {
  description = "Per-tenant quotas, each as the balancer's --quota takes it, e.g. [\"*=leases:8,memory-gib:160\", \"team-a=leases:32\"]."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for q in var.quotas : can(regex("^[^=;]+=[^;]+$", q))])
    error_message = "Each quota must look like TENANT=leases:N,memory-gib:M (no semicolons)."
  }
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the balancer's log."
  type        = number
  default     = 365
}

variable "metrics_port" {
  description = "TCP port of the Prometheus endpoint (GET /metrics, --metrics-listen); null: no endpoint."
  type        = number
  default     = null
  validation {
    condition     = var.metrics_port == null ? true : (var.metrics_port >= 1024 && var.metrics_port <= 65535)
    error_message = "metrics_port must be null or a port in 1024-65535."
  }
}

variable "tenants" {
  description = "The tenants that lease GPUs, by name, each with its quota as the balancer's --quota takes it after the '=' (e.g. \"leases:8,memory-gib:160\"; null: the default quota). Each gets its own credential in Secrets Manager (output tenant_secret_arns); a client's tenant is the one its credential belongs to."
  type = map(object({
    quota = optional(string)
  }))
  default = {}
  validation {
    condition     = alltrue([for t, v in var.tenants : can(regex("^[A-Za-z0-9._-]{1,64}$", t)) && (v.quota == null ? true : can(regex("^[^=;#\\s]+$", v.quota)))])
    error_message = "Tenant names must be 1 to 64 letters, digits, dots, dashes or underscores; a quota looks like leases:N,memory-gib:M (no '=', ';', '#' or spaces)."
  }
}

variable "allow_shared_client_secret" {
  description = "Legacy: keep the one client secret shared by every client (output client_secret), which leases for any tenant and sees every lease. Only while clients move to their tenants' credentials; the balancer logs a warning."
  type        = bool
  default     = false
}
