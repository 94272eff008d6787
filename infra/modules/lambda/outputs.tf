output "layer_arn" {
  description = "ARN (with version) of the gpupool layer: add it to your own functions."
  value       = aws_lambda_layer_version.gpupool.arn
}

output "function_name" {
  description = "Name of the example function."
  value       = aws_lambda_function.example.function_name
}

output "function_arn" {
  description = "ARN of the example function."
  value       = aws_lambda_function.example.arn
}
