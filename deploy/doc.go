// Package deploy holds fleetgate's deployment files, not Go code: the
// Grafana dashboard (grafana/), the Prometheus alert rules and their unit
// tests (prometheus/), the hardened systemd unit (systemd/) and the
// annotated example configuration (fleetgate.example.yaml). Its tests check
// them with promtool and systemd-analyze and against a running server
// (README.md).
package deploy
