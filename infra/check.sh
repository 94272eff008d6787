#!/usr/bin/env bash
# Offline checks of the Terraform under infra/ (no AWS account, no provider
# downloads):
#   1. terraform fmt -check, and loading the example root with its modules
#      (terraform init without providers), where terraform is installed
#      (skipped otherwise);
#   2. infra/check-wiring.py: variables, locals, module arguments and module
#      outputs that the configuration names exist (what `terraform validate`
#      would say without providers);
#   3. checkov (pinned, installed from PyPI into target/infra-venv on first use)
#      over infra/, with no failed checks; every skipped check is a
#      #checkov:skip comment with its reason at the resource.
# The MIG layouts of the example and the README are checked against the
# server's profile tables by `cargo test -p gpupool-tests --test infra`.
#
# Env: CHECKOV_VENV  where to keep the checkov virtualenv (default target/infra-venv)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

checkov_version=3.3.30
venv=${CHECKOV_VENV:-target/infra-venv}

echo "== terraform fmt"
if command -v terraform >/dev/null; then
    terraform fmt -check -recursive -diff infra
    echo "terraform fmt: ok ($(terraform version | head -n 1))"
else
    echo "terraform fmt: skipped (terraform is not installed)"
fi

echo "== terraform configuration (offline)"
# `terraform init` loads every module of the example root and checks its
# syntax and the rules of its validation blocks before it looks for
# providers; with an empty plugin directory it stops there, offline.
# `terraform validate` and `plan` need the providers, so a real deployment
# runs them; check-wiring.py below covers what they would say about names.
if command -v terraform >/dev/null; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cp -r infra "$scratch/infra"
    mkdir -p "$scratch/plugins"
    set +e
    out=$(terraform -chdir="$scratch/infra/examples/pool" init -backend=false -input=false -no-color \
        -plugin-dir="$scratch/plugins" 2>&1)
    set -e
    errors=$(grep '^Error: ' <<<"$out" | grep -v 'Failed to query available provider packages' || true)
    if [[ -n $errors ]] || ! grep -q 'Initializing provider plugins' <<<"$out"; then
        echo "$out" >&2
        echo "terraform configuration: FAILED" >&2
        exit 1
    fi
    echo "terraform configuration: ok (modules load; providers not installed offline)"
else
    echo "terraform configuration: skipped (terraform is not installed)"
fi

echo "== checkov $checkov_version (and the wiring check, on checkov's HCL parser)"
if [[ $("$venv/bin/checkov" --version 2>/dev/null) != "$checkov_version" ]]; then
    echo "installing checkov $checkov_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$checkov_version"
fi
"$venv/bin/python" infra/check-wiring.py infra
# --download-external-modules false and no API key: nothing leaves the machine
# but the PyPI install above.
"$venv/bin/checkov" -d infra --framework terraform --quiet --compact \
    --download-external-modules false --skip-download
