variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key for the volumes, the secrets and the log group."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets the auto-scaling group launches gpu-servers in."
  type        = list(string)
}

variable "security_group_id" {
  description = "Security group of the gpu-servers (network module)."
  type        = string
}

variable "instance_type" {
  description = "MIG-capable instance type: one of the instance_types of mig-profiles.json (p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, p5en.48xlarge)."
  type        = string
  validation {
    condition     = !can(regex("^g[0-9]", var.instance_type))
    error_message = "G-family instances (g4dn, g5, g6, g6e, ...) carry T4, A10G, L4 or L40S GPUs, which have no MIG: gpupool's fleet partitions GPUs with MIG. Use p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge or p5en.48xlarge."
  }
  validation {
    condition     = contains(keys(local.mig.instance_types), var.instance_type)
    error_message = "Not a MIG-capable instance type that infra/modules/gpu-fleet/mig-profiles.json knows. Use one of: p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, p5en.48xlarge."
  }
}

variable "mig_layout" {
  description = "MIG layout of every GPU: profile names of the instance type's GPU model, e.g. [\"3g.40gb\", \"2g.20gb\", \"1g.10gb\", \"1g.10gb\"] on p5.48xlarge. Checked here against mig-profiles.json (names exist; memory slices add up to at most 8, compute slices to at most 7); tests/tests/infra.rs shows that for these tables this is exactly the placement check of Layout::plan."
  type        = list(string)
  validation {
    condition     = length(var.mig_layout) >= 1 && length(var.mig_layout) <= 7
    error_message = "mig_layout must name 1 to 7 MIG profiles (a GPU holds at most 7 instances)."
  }
  validation {
    condition     = alltrue([for n in var.mig_layout : contains(keys(local.profiles), n)])
    error_message = "mig_layout names a profile that the instance type's GPU does not have. Profiles by instance type: ${join("; ", [for t, m in local.mig.instance_types : "${t}: ${join(", ", keys(local.mig.models[m].profiles))}"])}."
  }
  validation {
    condition     = sum(concat([0], [for n in var.mig_layout : try(local.profiles[n].memory_slices, 0)])) <= 8
    error_message = "mig_layout needs more than the GPU's 8 memory slices (1g = 1, 1g doubled and 2g = 2, 3g and 4g = 4, 7g = 8)."
  }
  validation {
    condition     = sum(concat([0], [for n in var.mig_layout : try(local.profiles[n].compute_slices, 0)])) <= 7
    error_message = "mig_layout needs more than the GPU's 7 compute slices (the Ng of each profile name adds N)."
  }
}

variable "server_count" {
  description = "Number of gpu-servers (the auto-scaling group's desired, minimum and maximum size). 0 keeps the fleet defined but stopped."
  type        = number
  default     = 1
  validation {
    condition     = var.server_count >= 0 && var.server_count <= 64 && floor(var.server_count) == var.server_count
    error_message = "server_count must be a whole number from 0 to 64."
  }
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI id: the AWS Deep Learning Base AMI (NVIDIA driver, fabric manager, AWS CLI)."
  type        = string
  default     = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
}

variable "root_volume_gib" {
  description = "Size of the encrypted root volume in GiB (the Deep Learning Base AMI needs about 100; the rest holds the module image cache)."
  type        = number
  default     = 200
  validation {
    condition     = var.root_volume_gib >= 120
    error_message = "root_volume_gib must be at least 120."
  }
}

variable "capacity_reservation_id" {
  description = "On-demand capacity reservation (ODCR) to launch into, if any: p4d/p5 capacity is often only available that way. (EC2 Capacity Blocks also need instance_market_options in the launch template, which this module does not set.)"
  type        = string
  default     = null
}

variable "balancer_url" {
  description = "The balancer's gRPC URL."
  type        = string
}

variable "server_secret_arn" {
  description = "Secret with the shared secret servers register with (balancer module)."
  type        = string
}

variable "lease_public_key_secret_arn" {
  description = "Secret with the balancer's lease public key (balancer module)."
  type        = string
}

variable "balancer_ca_secret_arn" {
  description = "Secret holding the PEM CA certificate the servers verify the balancer's gRPC certificate with (balancer module)."
  type        = string
}

variable "balancer_client_tls" {
  description = "Secrets holding the PEM client certificate and key the servers present to the balancer (balancer module)."
  type = object({
    cert = string
    key  = string
  })
}

variable "tls_secret_arns" {
  description = "Your own certificate for the gpu-servers: ARNs of two secrets holding the PEM certificate chain and the PEM private key (encrypted with a key the servers may decrypt). Null: the module makes a self-signed certificate (clients pin it through their leases)."
  type = object({
    cert = string
    key  = string
  })
  default = null
}

variable "artifact_bucket" {
  description = "Artifact bucket holding the gpu-server binary."
  type        = string
}

variable "binary_key" {
  description = "Object key of the gpupool-server binary in the artifact bucket."
  type        = string
}

variable "binary_version" {
  description = "S3 version id of the binary (a new build changes the launch template and rolls the fleet)."
  type        = string
}

variable "quic_port" {
  description = "UDP port of the QUIC listener."
  type        = number
  default     = 4433
}

variable "worker_ports" {
  description = "UDP port range of the session worker processes, as [low, high]; as many ports as sessions at once."
  type        = list(number)
  default     = [4434, 4499]
}

variable "session_memory_mib" {
  description = "Device memory quota of each session in MiB (null: the server's default)."
  type        = number
  default     = null
}

variable "staging_host_mib" {
  description = "Host memory all sessions of a gpu-server may hold in staged bulk copies together, in MiB (null: the server's default, a quarter of the host's memory; docs/transport.md, \"The host's staging cap\")."
  type        = number
  default     = null
  validation {
    condition     = var.staging_host_mib == null ? true : var.staging_host_mib > 0
    error_message = "staging_host_mib must be null or more than 0."
  }
}

variable "swap_host_mib" {
  description = "Host memory for the device memory of idle sessions swapped out when a GPU's memory is full, in MiB (0: no swapping; docs/swap.md). What lets the balancer overcommit a GPU's memory with shared leases."
  type        = number
  default     = 0
  validation {
    condition     = var.swap_host_mib >= 0
    error_message = "swap_host_mib must be 0 or more."
  }
}

variable "swap_disk_mib" {
  description = "Disk for swapped contents once swap_host_mib is full, in MiB (0: none); swap files are made under /var/lib/gpupool/swap and unlinked at once."
  type        = number
  default     = 0
  validation {
    condition     = var.swap_disk_mib >= 0
    error_message = "swap_disk_mib must be 0 or more."
  }
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the gpu-servers' logs."
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
