output "role_arn" {
  description = "ARN of the role."
  value       = aws_iam_role.this.arn
}

output "instance_profile_name" {
  description = "Name of the instance profile."
  value       = aws_iam_instance_profile.this.name
}

output "instance_profile_arn" {
  description = "ARN of the instance profile."
  value       = aws_iam_instance_profile.this.arn
}

output "policy_id" {
  description = "ID of the role's inline policy (depend on it so instances start with their permissions)."
  value       = aws_iam_role_policy.this.id
}

output "log_group_name" {
  description = "Name of the instance's log group."
  value       = aws_cloudwatch_log_group.this.name
}
