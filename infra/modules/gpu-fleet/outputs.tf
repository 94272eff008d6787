output "autoscaling_group_name" {
  description = "Name of the gpu-servers' auto-scaling group."
  value       = aws_autoscaling_group.this.name
}

output "gpu_model" {
  description = "GPU model key of the instance type (mig-profiles.json)."
  value       = local.model
}

output "instances_per_server" {
  description = "MIG instances each server offers (8 GPUs times the layout)."
  value       = 8 * length(var.mig_layout)
}

output "log_group" {
  description = "CloudWatch log group of the gpu-servers (streams INSTANCE/server, INSTANCE/mig, INSTANCE/boot)."
  value       = module.role.log_group_name
}

output "role_arn" {
  description = "IAM role of the gpu-servers (grant it kms:Decrypt on the key of your own TLS secrets, if you bring them)."
  value       = module.role.role_arn
}
