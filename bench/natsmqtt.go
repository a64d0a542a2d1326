package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// NATSBin is nats-server, the third peer: NATS's own MQTT listener. `make
// bench` builds it from the Go module go.mod names as a tool, so the
// version compared against is pinned like every other dependency.
var NATSBin = "bin/nats-server"

// natsNode is one nats-server of the benchmark: the single server, or a
// node of the 3-node cluster (cluster set: its route listener and the
// other nodes' routes).
type natsNode struct {
	name    string // server_name and directory under the work directory
	host    string // 127.0.0.N
	port    int    // MQTT
	cluster *natsRoutes
}

type natsRoutes struct {
	listen string   // host:port of this node's routes
	routes []string // the other nodes' route addresses
}

func (n natsNode) dir(e *Env) string { return filepath.Join(e.Work, n.name) }

// writeNATSConfig writes nats-server's configuration for the job fleetgate
// does, as a NATS user would set it up: the MQTT listener with mTLS and
// verify_and_map (each client certificate's URI SAN is its user), one user
// per identity with publish/subscribe permissions equal to fleetgate's
// default policy and mosquitto's ACL, and JetStream on (NATS's MQTT needs it
// for sessions and QoS 1). Everything not set is nats-server's default
// (JetStream syncs to disk every 2 minutes, max_ack_pending 1024).
func (e *Env) writeNATSConfig(n natsNode) (string, error) {
	dir := n.dir(e)
	if err := os.MkdirAll(filepath.Join(dir, "js"), 0o700); err != nil {
		return "", err
	}
	root, err := os.ReadFile(filepath.Join(e.DataDir(), "ca", "root.crt"))
	if err != nil {
		return "", err
	}
	issuing, err := os.ReadFile(filepath.Join(e.DataDir(), "ca", "issuing.crt"))
	if err != nil {
		return "", err
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, append(append(root, '\n'), issuing...), 0o644); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# nats-server for the fleetgate benchmark; written by fleetbench\n")
	fmt.Fprintf(&b, "server_name: %q\nlisten: \"%s:-1\"\nhttp: \"%s:-1\"\n", n.name, n.host, n.host)
	fmt.Fprintf(&b, "jetstream {\n  store_dir: %q\n}\n", filepath.Join(dir, "js"))
	if c := n.cluster; c != nil {
		fmt.Fprintf(&b, "cluster {\n  name: fleetbench\n  listen: %q\n  routes: [\n", c.listen)
		for _, r := range c.routes {
			fmt.Fprintf(&b, "    \"nats-route://%s\"\n", r)
		}
		b.WriteString("  ]\n}\n")
	}
	// in a cluster its MQTT streams are R3 as fleetgate's are (by default
	// NATS takes the number of servers it sees when the first client
	// connects, which may be 2 while the third's routes come up)
	replicas := ""
	if n.cluster != nil {
		replicas = "  stream_replicas: 3\n"
	}
	fmt.Fprintf(&b, "mqtt {\n  listen: \"%s:%d\"\n%s  tls {\n    cert_file: %q\n    key_file: %q\n    ca_file: %q\n    verify_and_map: true\n    timeout: 5\n  }\n}\n",
		n.host, n.port, replicas, filepath.Join(e.DataDir(), "tls", "server.crt"), filepath.Join(e.DataDir(), "tls", "server.key"), caFile)
	b.WriteString("authorization {\n  users = [\n")
	// $MQTT.sub.> is the delivery subject of the JetStream consumer behind
	// each QoS 1 subscription: a user with permissions needs it.
	user := func(id Identity, pub, sub []string) error {
		if id.Cert.Leaf == nil || len(id.Cert.Leaf.URIs) != 1 {
			return fmt.Errorf("%s: certificate without exactly one URI SAN", id.Name)
		}
		q := func(ss []string) string {
			out := make([]string, len(ss))
			for i, s := range ss {
				out[i] = fmt.Sprintf("%q", s)
			}
			return strings.Join(out, ", ")
		}
		fmt.Fprintf(&b, "    { user: %q, permissions: { publish: { allow: [%s] }, subscribe: { allow: [%s] } } }\n",
			id.Cert.Leaf.URIs[0].String(), q(pub), q(append(sub, "$MQTT.sub.>")))
		return nil
	}
	if err := user(e.Backend, []string{"devices.*.commands", "devices.*.commands.>"}, []string{"devices.*.telemetry", "devices.*.telemetry.>"}); err != nil {
		return "", err
	}
	for _, d := range e.Devices {
		if d.Name == "" {
			continue
		}
		p := "devices." + d.Name
		if err := user(d, []string{p + ".telemetry", p + ".telemetry.>"}, []string{p + ".commands", p + ".commands.>"}); err != nil {
			return "", err
		}
	}
	b.WriteString("  ]\n}\n")
	path := filepath.Join(dir, "nats.conf")
	return path, os.WriteFile(path, []byte(b.String()), 0o600)
}

// StartNATS runs nats-server with the harness's configuration and waits
// until its MQTT listener accepts connections. Its JetStream store starts
// empty each time, as mosquitto's memory does.
func (e *Env) StartNATS(ctx context.Context) (*Broker, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	return e.startNATSNode(ctx, natsNode{name: "nats", host: "127.0.0.1", port: port})
}

func (e *Env) startNATSNode(ctx context.Context, n natsNode) (*Broker, error) {
	if _, err := os.Stat(NATSBin); err != nil {
		return nil, fmt.Errorf("nats-server: %w (make bench builds it into bin/)", err)
	}
	if err := os.RemoveAll(filepath.Join(n.dir(e), "js")); err != nil {
		return nil, err
	}
	conf, err := e.writeNATSConfig(n)
	if err != nil {
		return nil, err
	}
	b, err := e.spawnPeer(ctx, n.name, NATSBin, []string{"-c", conf}, net.JoinHostPort(n.host, fmt.Sprint(n.port)))
	if err != nil {
		return nil, errors.Join(err, fmt.Errorf("configuration: %s", conf))
	}
	return b, nil
}
