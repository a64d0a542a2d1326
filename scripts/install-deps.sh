#!/usr/bin/env bash
# Installs the Debian packages fleetgate's demo and tests need, only if one
# is missing. Idempotent; needs root (or sudo) on a Debian/Ubuntu machine.
set -euo pipefail
need=()
command -v swtpm >/dev/null 2>&1 || need+=(swtpm)
command -v swtpm_setup >/dev/null 2>&1 || need+=(swtpm-tools)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v tpm2_startup >/dev/null 2>&1 || need+=(tpm2-tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
# PKI: SoftHSM2 for the PKCS#11 key store's tests
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
# console and deploy/: promtool checks the alert rules, Chromium runs the console's browser test
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# the executable docs (internal/doctest): jq in devices.md, a network namespace per document
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v git >/dev/null 2>&1 || need+=(git)
# deploy/: systemd-analyze checks the hardened unit; haproxy checks and runs deploy/haproxy.cfg
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v go >/dev/null 2>&1 || { echo "Go is required (https://go.dev/dl/); go.mod names the version" >&2; exit 1; }
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
