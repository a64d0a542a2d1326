#!/usr/bin/env bash
# make demo: initialise a data directory (if it has no CA yet), start
# `fleetgate serve`, run a small simulated fleet through it, print the
# report, and stop everything this script started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-./fleetgate-data}
DEVICES=${DEVICES:-10}
PREFIX=demo-$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
MQTT_PORT=${MQTT_PORT:-8883}
API_PORT=${API_PORT:-8443}
METRICS_PORT=${METRICS_PORT:-9090}
BIN=./bin
RUN_DIR=$(mktemp -d -t fleetgate-demo-XXXXXX)
SERVE_PID=""

cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
  fi
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM

t0=$(date +%s.%N)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. fleetgate init: PKI in $DATA_DIR (kept if it exists)"
$BIN/fleetgate init --data-dir "$DATA_DIR"

say "2. fleetgate serve: enrollment API :$API_PORT, MQTT mTLS broker :$MQTT_PORT, metrics 127.0.0.1:$METRICS_PORT"
$BIN/fleetgate serve --data-dir "$DATA_DIR" \
  --mqtt-addr "127.0.0.1:$MQTT_PORT" --api-addr "127.0.0.1:$API_PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" \
  --addr-file "$RUN_DIR/addrs.json" --log-level info 2>"$RUN_DIR/serve.log" &
SERVE_PID=$!
for _ in $(seq 1 100); do
  [ -s "$RUN_DIR/addrs.json" ] && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "fleetgate serve exited:"; cat "$RUN_DIR/serve.log"; exit 1; }
  sleep 0.1
done
[ -s "$RUN_DIR/addrs.json" ] || { echo "fleetgate serve did not start"; cat "$RUN_DIR/serve.log"; exit 1; }
echo "serving (pid $SERVE_PID)"

say "3. fleetsim: $DEVICES devices, each with its own swtpm, are registered (EK bulk import), enroll by TPM attestation, connect over mTLS, publish telemetry to a backend service; then one is revoked"
t_fs=$(date +%s.%N)
status=0
$BIN/fleetsim run --data-dir "$DATA_DIR" --server "https://localhost:$API_PORT" --broker "localhost:$MQTT_PORT" \
  --devices "$DEVICES" --prefix "$PREFIX" --messages 5 --scenario revoke --revoke-fraction 0.1 --json "$RUN_DIR/report.json" || status=$?

say "4. what the gateway logged as refused (each refusal has a reason)"
grep -E "acl denied|refused|closing session" "$RUN_DIR/serve.log" | head -6 | cut -c1-200 || true

say "5. the registry: fleetgate devices list"
$BIN/fleetgate devices list --data-dir "$DATA_DIR" --server "https://localhost:$API_PORT" | grep -E "^ID|^$PREFIX" | head -12

t1=$(date +%s.%N)
first_ns=$(sed -n 's/.*"first_delivery_ns": *\([0-9]*\).*/\1/p' "$RUN_DIR/report.json" 2>/dev/null | head -1)
first_msg=""
if [ -n "$first_ns" ]; then
  first_msg="first telemetry delivered $(awk "BEGIN{printf \"%.1f\", $t_fs - $t0 + $first_ns/1e9}") s after the demo script started; "
fi
cat <<MSG

What you just saw: a CA was created (or reused) in $DATA_DIR. Each simulated
device got its own software TPM (swtpm) with an EK certificate from a
simulated TPM manufacturer; the "factory" registered the EKs in one bulk
import. Each device then proved to the enrollment service that its TLS key
lives in that TPM (credential activation of its attestation key, TPM2_Certify
of the TLS key) and got an X.509 certificate for it. It connected to the MQTT
broker with nothing but that certificate (mTLS, the handshake signed inside
the TPM, client ID = device ID) and published telemetry that a backend
service received. A device publishing into another device's topic was
dropped by the broker's policy; its subscription to another device's
commands was refused. Then one device was revoked while all kept
publishing: its session was closed before the revoke call returned, nothing
it sent afterwards reached the backend, it could not reconnect, and the
others kept flowing. Every swtpm was stopped when fleetsim ended.

Try next:
  $BIN/fleetgate serve --data-dir $DATA_DIR            # keep a gateway running
  $BIN/fleetgate tokens create --device my-sensor --group lab   # a device without TPM
  $BIN/fleetgate devices revoke <id> --reason test        # cut a device off at once
  $BIN/fleetgate services issue --name backend          # then mosquitto_sub with it
  $BIN/fleetgate audit                                   # every enrollment and refusal
  docs/quickstart.md, docs/architecture.md

${first_msg}demo finished in $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s
MSG
exit $status
