output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "private_subnet_ids" {
  description = "IDs of the private subnets, one per availability zone."
  value       = aws_subnet.private[*].id
}

output "client_security_group_id" {
  description = "Security group for gpupool clients (Lambda functions, containers): it may reach the gpu-servers and the balancer."
  value       = aws_security_group.client.id
}

output "gpu_server_security_group_id" {
  description = "Security group of the gpu-servers."
  value       = aws_security_group.gpu_server.id
}

output "balancer_security_group_id" {
  description = "Security group of the balancer."
  value       = aws_security_group.balancer.id
}

output "interface_endpoints" {
  description = "Service name -> ID of each interface VPC endpoint."
  value       = { for k, e in aws_vpc_endpoint.interface : k => e.id }
}

output "monitoring_security_group_id" {
  description = "Security group to attach to the Prometheus host: it may scrape the gpu-servers' and the balancer's /metrics on metrics_port."
  value       = aws_security_group.monitoring.id
}
