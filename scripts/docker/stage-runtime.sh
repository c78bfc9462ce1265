#!/usr/bin/env bash
# Stages what the runtime image needs from the build stage, under STAGE at the paths they have
# here (so the binary's RPATH and LibTorch's $ORIGIN RPATHs hold unchanged):
#   /usr/local/bin/difftrain, /opt/difftrain/{configs,scripts/launch.sh}, the built-in dataset, and
#   each shared library the binary loads that this build stage added: LibTorch from the project
#   venv and the Debian libraries (spdlog, fmt, stb, turbojpeg). Libraries of the base image (glibc,
#   libstdc++, and a base's own PyTorch and CUDA, as in the PyTorch images) are not copied: the
#   runtime stage starts from the same base, or from its runtime flavour.
#
#   scripts/docker/stage-runtime.sh BINARY STAGE
set -euo pipefail
binary=$1 stage=$2
venv=${DIFFTRAIN_VENV:?DIFFTRAIN_VENV names the project venv}
src=$(cd "$(dirname "$0")/../.." && pwd)

install -D -m 0755 "$binary" "$stage/usr/local/bin/difftrain"
mkdir -p "$stage/opt/difftrain/scripts"
cp -r "$src/configs" "$stage/opt/difftrain/configs"
install -m 0755 "$src/scripts/launch.sh" "$stage/opt/difftrain/scripts/launch.sh"
if [ -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p "$stage/usr/share/datasets"
  cp -r /usr/share/datasets/fashion-mnist "$stage/usr/share/datasets/"
fi

if ldd "$binary" | grep -q "not found"; then
  ldd "$binary" | grep "not found" >&2
  echo "stage-runtime: $binary has unresolved libraries" >&2
  exit 2
fi
venv_real=$(readlink -f "$venv")
total=0
while read -r name path; do
  case "$name" in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | libutil.so* | \
      libresolv.so* | libgcc_s.so* | libstdc++.so*) continue ;;
  esac
  real=$(readlink -f "$path")
  case "$real" in
    "$venv_real"/* | /usr/lib/* | /lib/*) ;;
    *) echo "stage-runtime: $name from the base image ($real)" >&2; continue ;;
  esac
  install -D -m 0644 "$real" "$stage$real"
  # The name the loader looks for (the soname), when the file has a longer one.
  [ "$(basename "$real")" = "$name" ] || ln -sf "$(basename "$real")" "$stage$(dirname "$real")/$name"
  total=$((total + $(stat -c %s "$real")))
  echo "stage-runtime: $name ($(( $(stat -c %s "$real") / 1000000 )) MB) $real" >&2
done < <(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')
echo "stage-runtime: $(( total / 1000000 )) MB of shared libraries staged" >&2
