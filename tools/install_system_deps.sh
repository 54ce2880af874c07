#!/usr/bin/env bash
# System packages carp_fast needs, installed with apt only where missing.
# A C++ compiler builds the fused-loss extension; pkg-config, OpenCV and libjpeg-turbo
# headers let the optional FFCV backend build from source.
set -euo pipefail
wanted=(g++ pkg-config libopencv-dev libturbojpeg0-dev)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_system_deps: missing ${missing[*]} and no apt-get here; install them by hand" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install_system_deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
