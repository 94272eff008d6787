output "url" {
  description = "The balancer's gRPC URL over TLS (what GPUPOOL_BALANCER takes), at its fixed private address."
  value       = local.url
}

output "address" {
  description = "The balancer's fixed private IP address."
  value       = local.address
}

output "instance_id" {
  description = "EC2 instance id of the balancer (for Session Manager)."
  value       = aws_instance.this.id
}

output "server_secret_arn" {
  description = "Secret the gpu-servers register with."
  value       = aws_secretsmanager_secret.server.arn
}

output "client_secret_arn" {
  description = "Legacy secret shared by every client (null unless allow_shared_client_secret)."
  value       = one(aws_secretsmanager_secret.client[*].arn)
}

output "client_secret" {
  description = "The legacy shared client secret itself (null unless allow_shared_client_secret)."
  value       = one(random_password.client[*].result)
  sensitive   = true
}

output "tenant_secret_arns" {
  description = "Secrets Manager ARN of each tenant's credential, by tenant (what its clients present as GPUPOOL_BALANCER_SECRET)."
  value       = { for t, s in aws_secretsmanager_secret.tenant : t => s.arn }
}

output "tenant_secrets" {
  description = "Each tenant's credential itself, by tenant (for a Lambda function's environment)."
  value       = { for t, p in random_password.tenant : t => p.result }
  sensitive   = true
}

output "public_key_secret_arn" {
  description = "Secret holding the lease-signing public key (written by the balancer; the gpu-servers read it)."
  value       = aws_secretsmanager_secret.public_key.arn
}

output "log_group" {
  description = "CloudWatch log group of the balancer."
  value       = module.role.log_group_name
}

output "tls_ca_secret_arn" {
  description = "Secret holding the PEM CA certificate that clients verify the balancer with (gpu-servers read it)."
  value       = aws_secretsmanager_secret.tls["ca"].arn
}

output "tls_ca_pem" {
  description = "The PEM CA certificate clients verify the balancer with (not a secret; the Lambda function's GPUPOOL_BALANCER_CA_PEM)."
  value       = tls_self_signed_cert.ca.cert_pem
}

output "server_client_tls_secret_arns" {
  description = "Secrets holding the gpu-servers' PEM client certificate and key, which the balancer requires from them."
  value = {
    cert = aws_secretsmanager_secret.tls["client-cert"].arn
    key  = aws_secretsmanager_secret.tls["client-key"].arn
  }
}
