#!/usr/bin/env bash
# make demo-cluster: three `fleetgate serve` nodes with embedded NATS
# JetStream on 127.0.0.1-3, a simulated fleet spread over them, one node
# SIGKILLed mid-run; the report shows every device back on the other two,
# no acknowledged QoS 1 message lost and the revoked devices kept out.
# fleetsim starts the nodes and stops exactly the processes it started (by
# PID), also on failure or Ctrl-C; this script bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${DEVICES:-30}
TPM=${TPM:-none}        # swtpm: one software TPM per device (slower to manufacture)
LIMIT=${LIMIT:-110}     # seconds; then fleetsim is interrupted and stops its nodes
BIN=./bin
WORK=$(mktemp -d -t fleetgate-demo-cluster-XXXXXX)
keep=0
cleanup() { [ "$keep" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

t0=$(date +%s.%N)
printf '\n\033[1m== fleetsim run --cluster 3 --scenario failover: %d devices (keys: %s), work dir %s\033[0m\n' "$DEVICES" "$TPM" "$WORK"
cat <<'MSG'
   1. fleetgate init once; the data directory is copied to node1..node3 (shared PKI)
   2. three `fleetgate serve --cluster-name --node-name --nats-listen --nats-routes`
      processes on 127.0.0.1, 127.0.0.2, 127.0.0.3 form one NATS JetStream cluster
   3. the fleet enrolls through node1; device i connects to node (i mod 3) first and
      knows the other two; a backend service on node1 subscribes to all telemetry
   4. every device publishes numbered QoS 1 telemetry; two devices are revoked
      through node2's API; then node3 is SIGKILLed
MSG
status=0
timeout --signal=INT --kill-after=30 "$LIMIT" \
  $BIN/fleetsim run --cluster 3 --scenario failover --devices "$DEVICES" --tpm "$TPM" \
  --fleetgate $BIN/fleetgate --work-dir "$WORK" --json "$WORK/report.json" || status=$?

if [ "$status" -ne 0 ]; then
  keep=1
  echo
  echo "demo-cluster FAILED (status $status); node logs kept in $WORK/node*.log"
  exit "$status"
fi
t1=$(date +%s.%N)
cat <<MSG

What you just saw: three fleetgate nodes, each with its own embedded NATS
server, formed one JetStream cluster (R3, every write synced before it is
acknowledged). Devices were spread over the three nodes. When node3 was
killed with SIGKILL, its devices reconnected to node1 and node2 (their SDK
tries the other nodes' addresses), took their persistent sessions over
(commands queued for them while they were away were delivered, without a
new SUBSCRIBE), and every QoS 1 message whose PUBACK a device had received
reached the backend service: a PUBACK is sent only once JetStream has
stored the message on a majority. The two revoked devices stayed out on
every node. fleetsim stopped the three processes it started, by PID.

Try next:
  $BIN/fleetsim run --cluster 3 --devices 100 --tpm none --scenario failover
  docs/cluster.md: running 3 nodes, behind HAProxy (deploy/haproxy.cfg), capacity

demo-cluster finished in $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s
MSG
