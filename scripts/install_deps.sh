#!/usr/bin/env bash
# Installs every build and test dependency of prehoc from Debian 12 packages.
# Idempotent: packages already present are skipped by apt-get. Uses sudo when not root.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
  python3-grpcio python3-protobuf  # clients/python and its test
  prometheus  # services_prometheus_scrape_test (a real scrape; 19 MB download, ~11 s install)
              # and promtool for the deploy_promtool_test (deploy/prometheus)
  python3-yaml  # tests/deploy (deploy/ and k8s/ manifests)
)

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all ${#PKGS[@]} packages already installed"
  exit 0
fi

echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
