#!/usr/bin/env bash
# Builds the difftrain images from docker/Dockerfile (docs/DOCKER.md), with Docker when a daemon
# answers, otherwise with podman (`--isolation chroot`: no daemon, no user namespaces needed).
#
#   scripts/docker-build.sh cpu          the slim CPU image              difftrain:cpu       (make docker-cpu)
#   scripts/docker-build.sh cpu-test     its test stage: unit tests, a 20-step training, --resume latest
#   scripts/docker-build.sh cuda         the CUDA image                  difftrain:cuda      (make docker)
#   scripts/docker-build.sh cuda-test    its test stage (the CUDA build, tested on the CPU)
#   scripts/docker-build.sh example      docker/examples/Dockerfile.custom-dataset FROM difftrain:cpu
#   scripts/docker-build.sh standin      a stand-in for the PyTorch devel image: Debian 12 with the pinned
#                                        torch wheel in the system Python (for machines that cannot pull it)
#
# Options:
#   --base IMAGE       the CUDA variant's base (default pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel;
#                      `--base standin` builds and uses the stand-in)
#   --tag TAG          the image name (defaults above)
#   --ca FILE          a CA bundle for TLS-intercepting proxies (default: $PIP_CERT, else $SSL_CERT_FILE,
#                      when set). Passed as a build secret: RUN steps that download trust it, no layer keeps it.
#   --pip-conf FILE    a pip.conf (index URLs, credentials), also a build secret. Without it, the host's
#                      PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST are passed the same way.
#   --engine docker|podman
#   -- ARGS            passed on to the build command (e.g. --build-arg TORCH_CUDA_ARCH_LIST=9.0)
#
# `debian:12` is pulled when the engine can; otherwise (no registry) it is made here with
# debootstrap from the Debian archive that /etc/apt names, and tagged docker.io/library/debian:12.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cuda_base_default=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel
standin_tag=localhost/difftrain-standin/pytorch:2.11.0-cuda13.0-devel

log() { printf '[docker-build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-1}"; }

what=${1:-}
[ -n "$what" ] || usage 1
case "$what" in -h|--help) usage 0 ;; cpu|cpu-test|cuda|cuda-test|example|standin) shift ;;
  *) log "unknown image '$what': one of cpu, cpu-test, cuda, cuda-test, example, standin"; exit 1 ;; esac

base=$cuda_base_default tag="" engine="" ca="${PIP_CERT:-${SSL_CERT_FILE:-}}" pip_conf="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --ca) ca=${2:?--ca needs a file}; [ -r "$ca" ] || die "--ca $ca: not a readable file"; shift 2 ;;
    --pip-conf) pip_conf=${2:?--pip-conf needs a file}; [ -r "$pip_conf" ] || die "--pip-conf $pip_conf: not a readable file"; shift 2 ;;
    --engine) engine=${2:?--engine needs docker or podman}; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) log "unknown option '$1'"; usage 1 ;;
  esac
done

# ---- the engine -------------------------------------------------------------------------------
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else die "neither a Docker daemon (docker info failed) nor podman (apt-get install podman) is available"; fi
fi
case "$engine" in
  docker) build=(docker build); export DOCKER_BUILDKIT=1 ;;  # secrets need BuildKit
  podman) build=(podman build --isolation chroot) ;;
  *) die "--engine $engine: docker or podman" ;;
esac
have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }

# ---- secrets: the CA bundle and pip settings, never baked into a layer ------------------------
secrets_dir=$(mktemp -d)
trap 'rm -rf "$secrets_dir"' EXIT
: > "$secrets_dir/ca.crt"
[ -n "$ca" ] && [ -r "$ca" ] && cp "$ca" "$secrets_dir/ca.crt"
if [ -n "$pip_conf" ]; then
  cp "$pip_conf" "$secrets_dir/pip.conf"
else
  { echo "[global]"
    [ -n "${PIP_INDEX_URL:-}" ] && echo "index-url = $PIP_INDEX_URL"
    [ -n "${PIP_EXTRA_INDEX_URL:-}" ] && echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
    [ -n "${PIP_TRUSTED_HOST:-}" ] && echo "trusted-host = $PIP_TRUSTED_HOST"
    true; } > "$secrets_dir/pip.conf"
fi
secret_args=(--secret "id=ca,src=$secrets_dir/ca.crt" --secret "id=pipconf,src=$secrets_dir/pip.conf")

# ---- debian:12, pulled or made with debootstrap -----------------------------------------------
debian_mirror() {  # the first Debian archive in the apt sources, else deb.debian.org
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE '(https?|file)://[^ ]+/debian/?( |$)' | grep -v security | head -n1 | tr -d ' ')
  echo "${uri:-http://deb.debian.org/debian}"
}
ensure_debian() {
  have_image docker.io/library/debian:12 && return 0
  log "debian:12 is not here; pulling it"
  if timeout 120 "$engine" pull docker.io/library/debian:12 >/dev/null 2>&1; then return 0; fi
  command -v debootstrap >/dev/null || die "cannot pull debian:12 and debootstrap is missing (apt-get install debootstrap)"
  [ "$(id -u)" -eq 0 ] || die "cannot pull debian:12; making it with debootstrap needs root"
  local mirror rootfs start
  mirror=$(debian_mirror) rootfs=$(mktemp -d) start=$(date +%s)
  log "making debian:12 with debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 ||
    { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs"; die "debootstrap failed (log above)"; }
  # The official image's sources (updates and security too) in deb822 form, and no package cache.
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian*}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["bash"]' - docker.io/library/debian:12 >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "debian:12 made in $(( $(date +%s) - start )) s"
}

# ---- one build --------------------------------------------------------------------------------
version=$(sed -n 's/^project(difftrain VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD 2>/dev/null || revision="$revision-dirty"
source=$(git -C "$root" remote get-url origin 2>/dev/null || true)
case "$source" in http*://*@*) source="${source%%//*}//${source#*@}" ;; esac  # no credentials in a label
run_build() {  # run_build DOCKERFILE TAG ARGS...
  local file=$1 name=$2 start; shift 2
  start=$(date +%s)
  log "$engine build -f ${file#"$root"/} -t $name $*"
  "${build[@]}" -f "$file" -t "$name" "${secret_args[@]}" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "SOURCE=$source" \
    "$@" "${extra[@]}" "$root"
  log "built $name in $(( $(date +%s) - start )) s"
}

ensure_debian
case "$what" in
  standin)
    name=${tag:-$standin_tag}
    run_build "$root/docker/standin/Dockerfile.pytorch-devel" "$name" ;;
  cpu|cpu-test)
    target=runtime; [ "$what" = cpu-test ] && target=test
    name=${tag:-difftrain:$what}
    run_build "$root/docker/Dockerfile" "$name" --target "$target" \
      --build-arg BASE=docker.io/library/debian:12 --build-arg RUNTIME_BASE=docker.io/library/debian:12 \
      --build-arg DIFFTRAIN_CUDA=OFF ;;
  cuda|cuda-test)
    if [ "$base" = standin ]; then
      have_image "$standin_tag" || run_build "$root/docker/standin/Dockerfile.pytorch-devel" "$standin_tag"
      base=$standin_tag
    fi
    target=runtime; [ "$what" = cuda-test ] && target=test
    name=${tag:-difftrain:$what}
    run_build "$root/docker/Dockerfile" "$name" --target "$target" \
      --build-arg "BASE=$base" --build-arg "RUNTIME_BASE=$base" --build-arg DIFFTRAIN_CUDA=ON ;;
  example)
    have_image difftrain:cpu || die "the example starts FROM difftrain:cpu: build it first (scripts/docker-build.sh cpu)"
    name=${tag:-difftrain-example:custom-dataset}
    run_build "$root/docker/examples/Dockerfile.custom-dataset" "$name" \
      --build-arg BASE=difftrain:cpu ;;
esac
"$engine" image inspect --format '{{.Size}}' "$name" 2>/dev/null |
  awk -v n="$name" '{ printf "[docker-build] %s: %.0f MB\n", n, $1 / 1e6 }' >&2 || true
