variable "name" {
  description = "Prefix of every resource name (the pool's name)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the flow-log group."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC. Each availability zone gets one private subnet of a quarter of it (at most four zones)."
  type        = string
  default     = "10.40.0.0/16"
  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 22
    error_message = "vpc_cidr must be an IPv4 CIDR block of /22 or larger (e.g. 10.40.0.0/16)."
  }
}

variable "availability_zones" {
  description = "Availability zones for the private subnets (GPU capacity differs per zone: list the ones you have capacity or reservations in)."
  type        = list(string)
  validation {
    condition     = length(var.availability_zones) >= 1 && length(var.availability_zones) <= 4 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must list 1 to 4 distinct zones."
  }
}

variable "quic_port" {
  description = "UDP port gpu-servers listen on for QUIC."
  type        = number
  default     = 4433
}

variable "worker_ports" {
  description = "UDP port range the gpu-servers' session worker processes bind, as [low, high]."
  type        = list(number)
  default     = [4434, 4499]
  validation {
    condition     = length(var.worker_ports) == 2 && var.worker_ports[0] <= var.worker_ports[1] && var.worker_ports[0] >= 1024 && var.worker_ports[1] <= 65535
    error_message = "worker_ports must be [low, high] with 1024 <= low <= high <= 65535."
  }
}

variable "balancer_port" {
  description = "TCP port of the balancer's gRPC service."
  type        = number
  default     = 50051
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps VPC flow logs."
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
