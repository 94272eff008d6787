output "instance_id" {
  description = "EC2 instance id of the monitoring host (Session Manager, port forwarding)."
  value       = aws_instance.this.id
}

output "address" {
  description = "Private IP address of the monitoring host."
  value       = aws_instance.this.private_ip
}

output "prometheus_url" {
  description = "Prometheus' URL inside the VPC (from allowed_cidrs)."
  value       = "http://${aws_instance.this.private_ip}:${var.prometheus_port}"
}

output "grafana_url" {
  description = "Grafana's URL inside the VPC (from allowed_cidrs); user admin, password in grafana_admin_secret_arn."
  value       = "http://${aws_instance.this.private_ip}:${var.grafana_port}"
}

output "grafana_admin_secret_arn" {
  description = "Secrets Manager ARN of Grafana's admin password (the password itself is in no output)."
  value       = aws_secretsmanager_secret.grafana_admin.arn
}

output "security_group_id" {
  description = "Security group that lets allowed_cidrs reach Prometheus and Grafana."
  value       = aws_security_group.this.id
}

output "log_group" {
  description = "CloudWatch log group of the monitoring host (streams INSTANCE/prometheus and INSTANCE/grafana)."
  value       = module.role.log_group_name
}
