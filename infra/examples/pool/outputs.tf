output "balancer_url" {
  description = "The balancer's gRPC URL inside the VPC (GPUPOOL_BALANCER for clients)."
  value       = module.balancer.url
}

output "balancer_ca_pem" {
  description = "PEM CA certificate that verifies the balancer's gRPC certificate (GPUPOOL_BALANCER_CA_PEM, or a GPUPOOL_BALANCER_CA_FILE, for clients)."
  value       = module.balancer.tls_ca_pem
}

output "balancer_instance_id" {
  description = "Instance id of the balancer: aws ssm start-session --target <id>."
  value       = module.balancer.instance_id
}

output "tenant_secret_arns" {
  description = "Secrets Manager ARN of each tenant's credential, by tenant (its clients' GPUPOOL_BALANCER_SECRET; with gpupool-balancer status, that tenant's leases)."
  value       = module.balancer.tenant_secret_arns
}

output "server_secret_arn" {
  description = "Secrets Manager ARN of the servers' secret, the operator's credential too (gpupool-balancer status --secret: the whole pool; drain)."
  value       = module.balancer.server_secret_arn
}

output "client_secret_arn" {
  description = "Legacy: Secrets Manager ARN of the shared client secret (null unless allow_shared_client_secret)."
  value       = module.balancer.client_secret_arn
}

output "layer_arn" {
  description = "ARN of the gpupool Lambda layer version."
  value       = module.lambda.layer_arn
}

output "function_name" {
  description = "Name of the example Lambda function."
  value       = module.lambda.function_name
}

output "client_security_group_id" {
  description = "Security group to give your own functions or containers so they may use the pool."
  value       = module.network.client_security_group_id
}

output "private_subnet_ids" {
  description = "Private subnets for your own functions or containers."
  value       = module.network.private_subnet_ids
}

output "gpu_autoscaling_group" {
  description = "Auto-scaling group of the GPU servers."
  value       = module.gpu_fleet.autoscaling_group_name
}

output "mig_instances_per_server" {
  description = "MIG instances each GPU server registers with the balancer."
  value       = module.gpu_fleet.instances_per_server
}

output "log_groups" {
  description = "CloudWatch log groups of the balancer and the GPU servers."
  value       = { balancer = module.balancer.log_group, gpu_servers = module.gpu_fleet.log_group }
}

output "monitoring_security_group_id" {
  description = "The monitoring host's scrape group (attach it to a Prometheus host of your own, too): it may scrape the pool's /metrics (metrics_port) and call the AWS API endpoints."
  value       = module.network.monitoring_security_group_id
}

output "prometheus_config" {
  description = "Prometheus scrape configuration for this pool (infra/monitoring/prometheus.yml.tftpl filled in; the monitoring host runs exactly this: terraform output -raw prometheus_config > prometheus.yml); null when metrics_port is null."
  value       = local.prometheus_config
}

output "monitoring" {
  description = "The monitoring host (null when monitoring.enabled is false or metrics_port null): instance id, private address, Prometheus and Grafana URLs inside the VPC, the secret with Grafana's admin password (user admin), its log group."
  value = local.monitoring ? {
    instance_id              = module.monitoring[0].instance_id
    address                  = module.monitoring[0].address
    prometheus_url           = module.monitoring[0].prometheus_url
    grafana_url              = module.monitoring[0].grafana_url
    grafana_admin_secret_arn = module.monitoring[0].grafana_admin_secret_arn
    log_group                = module.monitoring[0].log_group
  } : null
}
