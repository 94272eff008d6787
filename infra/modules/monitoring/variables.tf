variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "kms_key_arn" {
  description = "The pool's KMS key: the volume, the Grafana admin secret, the log group."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the pool (network module)."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC: who may reach Prometheus and Grafana when allowed_cidrs is null."
  type        = string
}

variable "subnet_id" {
  description = "Private subnet the monitoring host runs in (no public address)."
  type        = string
}

variable "scrape_security_group_id" {
  description = "The network module's monitoring security group: it may scrape the pool's metrics port and call the AWS API endpoints. The host gets it besides its own group."
  type        = string
}

variable "allowed_cidrs" {
  description = "IPv4 CIDR blocks that may reach Prometheus (prometheus_port) and Grafana (grafana_port); null: the VPC's CIDR. Never 0.0.0.0/0: Prometheus has no authentication."
  type        = list(string)
  default     = null
  validation {
    condition     = var.allowed_cidrs == null ? true : alltrue([for c in var.allowed_cidrs : can(cidrnetmask(c)) && c != "0.0.0.0/0"])
    error_message = "allowed_cidrs must be IPv4 CIDR blocks other than 0.0.0.0/0."
  }
}

variable "instance_type" {
  description = "Instance type of the monitoring host (x86-64: the releases are linux-amd64)."
  type        = string
  default     = "t3.small"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must be an EC2 instance type such as t3.small."
  }
}

variable "volume_size_gib" {
  description = "Size of the root volume, which holds Prometheus' data (replacing the instance starts it empty)."
  type        = number
  default     = 30
  validation {
    condition     = var.volume_size_gib >= 8 && var.volume_size_gib <= 16384
    error_message = "volume_size_gib must be within 8-16384."
  }
}

variable "retention" {
  description = "How long Prometheus keeps samples (--storage.tsdb.retention.time, e.g. 15d)."
  type        = string
  default     = "30d"
  validation {
    condition     = can(regex("^[0-9]+(h|d|w|y)$", var.retention))
    error_message = "retention must be a Prometheus duration such as 30d."
  }
}

variable "prometheus_port" {
  description = "TCP port of Prometheus' web UI and API."
  type        = number
  default     = 9090
}

variable "grafana_port" {
  description = "TCP port of Grafana."
  type        = number
  default     = 3000
}

variable "artifact_bucket" {
  description = "Artifact bucket holding the Prometheus and Grafana tarballs."
  type        = string
}

variable "prometheus" {
  description = "The Prometheus release: version, sha256 of its linux-amd64 tarball (infra/monitoring/releases.json), object key and S3 version id of the tarball in the artifact bucket."
  type = object({
    version        = string
    sha256         = string
    key            = string
    object_version = string
  })
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.prometheus.sha256))
    error_message = "prometheus.sha256 must be 64 lower-case hex digits: pin it with python3 infra/fetch-monitoring.py --pin."
  }
}

variable "grafana" {
  description = "The Grafana release: version, sha256 of its linux-amd64 tarball (infra/monitoring/releases.json), object key and S3 version id of the tarball in the artifact bucket."
  type = object({
    version        = string
    sha256         = string
    key            = string
    object_version = string
  })
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.grafana.sha256))
    error_message = "grafana.sha256 must be 64 lower-case hex digits: pin it with python3 infra/fetch-monitoring.py --pin."
  }
}

variable "prometheus_config" {
  description = "Prometheus configuration (prometheus.yml), rendered from infra/monitoring/prometheus.yml.tftpl by the root, which outputs the same text."
  type        = string
}

variable "dashboard_json" {
  description = "Grafana dashboard JSON to provision (infra/monitoring/grafana-dashboard.json); its datasource variable picks the provisioned Prometheus."
  type        = string
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the monitoring host's logs."
  type        = number
  default     = 365
}
