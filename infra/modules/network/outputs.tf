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
  description = "Security group of the Prometheus host (modules/monitoring attaches it; or attach it to your own): it may scrape the gpu-servers' and the balancer's /metrics on metrics_port and call the AWS API endpoints (EC2 service discovery)."
  value       = aws_security_group.monitoring.id
}

output "vpc_cidr" {
  description = "CIDR block of the VPC."
  value       = aws_vpc.this.cidr_block
}
