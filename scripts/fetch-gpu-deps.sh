#!/usr/bin/env bash
# Run HERE (not on the GPU machine): the GPU machine has nvcc, CMake, ninja and PyTorch but no
# Debian -dev packages and no network. This downloads the header and library packages difftrain
# builds against and unpacks them into .gpu-deps/ (git-ignored), which the device call carries:
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-deps"])
# An argument names another destination (scripts/gpu-prepare.sh puts them in .gpu-carry/deps).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.gpu-deps}
case $dest in /*) ;; *) dest=$PWD/$dest ;; esac
packages=(libcli11-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 nlohmann-json3-dev libgtest-dev libgloo-dev zlib1g-dev libstb-dev libstb0 libturbojpeg0-dev libturbojpeg0)
rm -rf "$dest" && mkdir -p "$dest/debs" "$dest/root"
(cd "$dest/debs" && apt-get download "${packages[@]}")
for deb in "$dest"/debs/*.deb; do dpkg -x "$deb" "$dest/root"; done
rm -rf "$dest/debs"
du -sh "$dest"
