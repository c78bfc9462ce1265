#!/bin/sh
# Runs a command of a docker/Dockerfile RUN step with the build secrets of scripts/docker-build.sh
# in effect, and leaves nothing of them in the layer:
#   /run/secrets/ca       a CA bundle (a TLS-intercepting proxy's), trusted next to the image's own
#                         by pip, Python's ssl, curl and apt;
#   /run/secrets/pipconf  a pip.conf (index URLs, credentials).
# Empty or absent secrets change nothing.
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -s /run/secrets/ca ]; then
  bundle=$tmp/ca.pem
  { [ -r /etc/ssl/certs/ca-certificates.crt ] && cat /etc/ssl/certs/ca-certificates.crt; cat /run/secrets/ca; } > "$bundle"
  export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle" CURL_CA_BUNDLE="$bundle"
  printf 'Acquire::https::CAInfo "%s";\n' "$bundle" > "$tmp/apt.conf"
  export APT_CONFIG="$tmp/apt.conf"
fi
if [ -s /run/secrets/pipconf ]; then
  export PIP_CONFIG_FILE=/run/secrets/pipconf
fi
"$@"
