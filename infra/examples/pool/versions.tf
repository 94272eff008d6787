terraform {
  required_version = ">= 1.9"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4.0"
    }
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0, < 5.0"
    }
  }
  # State holds the pool's generated secrets (server and client secrets, the
  # self-signed TLS key): keep it in an encrypted remote backend, e.g.
  #   backend "s3" { bucket = "...", key = "gpupool/terraform.tfstate", region = "us-east-1", encrypt = true, use_lockfile = true }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = {
      Project = "gpupool"
      Pool    = var.name
    }
  }
}
