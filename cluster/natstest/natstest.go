// Package natstest starts a NATS JetStream cluster of embedded nodes for
// tests: node i listens on 127.0.0.(i+1), and every route between two
// nodes passes through a TCP relay the test controls, so that it can cut a
// node off (Cut) and heal it (Heal). Everything started is stopped by
// handle when the test ends. Routes are mutual TLS with a cluster CA of
// the test's own (CA, CAFile); each node's client listener speaks TLS and
// admits one user with every permission (ClientURL).
package natstest

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/netcut"
)

// Cluster is a running test cluster.
type Cluster struct {
	t     testing.TB
	Nodes []*natsnode.Node
	*Mesh
	tune func(i int, cfg *natsnode.Config)
	// CA is the cluster CA; CAFile its certificate (PEM), for clients of
	// the client listeners.
	CA     *natsnode.ClusterCA
	CAFile string
	pass   string
}

// ClientUser is the client listeners' user; its password is in
// ClientURL.
const ClientUser = "test"

// Mesh is the routes of n nodes through relays (cluster/netcut): node i
// reaches node j through Route(i, j); Cut and Heal act on every route of a
// node.
type Mesh = netcut.Mesh

// Relay forwards TCP connections; Cut closes them until Heal.
type Relay = netcut.Relay

// NewRelay listens on host (a free port) and forwards to target().
func NewRelay(host string, target func() string) (*Relay, error) {
	return netcut.NewRelay(host, target)
}

// NewMesh starts the relays of n nodes (node i's on Host(i)), stopped when
// the test ends; SetTarget tells where node j listens for routes.
func NewMesh(t testing.TB, n int) *Mesh {
	t.Helper()
	m, err := netcut.NewMesh(n, Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// FreeAddr returns host:port with a port free at the time of the call.
func FreeAddr(t testing.TB, host string) string {
	t.Helper()
	ln, err := net.Listen("tcp", host+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Host returns the loopback address of node i.
func Host(i int) string { return fmt.Sprintf("127.0.0.%d", i+1) }

// Start starts n nodes (n ≥ 3 for R3) and waits until JetStream has a
// meta leader.
func Start(t testing.TB, n int) *Cluster { t.Helper(); return StartWith(t, n, nil) }

// StartWith is Start with each node's configuration adjusted by tune.
func StartWith(t testing.TB, n int, tune func(i int, cfg *natsnode.Config)) *Cluster {
	t.Helper()
	c := &Cluster{t: t, Nodes: make([]*natsnode.Node, n), Mesh: NewMesh(t, n), tune: tune, pass: rand.Text()}
	dir := t.TempDir()
	ca, err := natsnode.CreateCA(filepath.Join(dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	c.CA, c.CAFile = ca, filepath.Join(dir, "ca", natsnode.CACertFile)
	for i := range n {
		c.StartNode(i, fmt.Sprintf("%s/n%d", dir, i))
	}
	c.WaitMeta(30 * time.Second)
	return c
}

// StartNode starts (or restarts, with the same store) node i.
func (c *Cluster) StartNode(i int, storeDir string) {
	c.t.Helper()
	cfg := natsnode.Config{Name: fmt.Sprintf("n%d", i), ClusterName: "fgtest",
		ClientAddr: Host(i) + ":0", ClusterAddr: Host(i) + ":0",
		Advertise: Advertise(i), Routes: c.Routes(i), StoreDir: storeDir,
		ClientUsers: []*server.User{{Username: ClientUser, Password: c.pass}}}
	var err error
	if cfg.TLS, err = c.CA.NodeTLS(cfg.Name, Host(i)); err != nil {
		c.t.Fatal(err)
	}
	if c.tune != nil {
		c.tune(i, &cfg)
	}
	node, err := natsnode.Start(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	c.Nodes[i] = node
	c.SetTarget(i, node.ClusterAddr())
	c.t.Cleanup(node.Shutdown)
}

// WaitMeta waits until every running node sees a JetStream meta leader.
func (c *Cluster) WaitMeta(d time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for _, n := range c.Nodes {
		for n != nil && n.Server().Running() && !n.Server().JetStreamIsCurrent() {
			if time.Now().After(deadline) {
				c.t.Fatalf("no JetStream meta leader after %s", d)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// Advertise is what node i tells the others as its route address: the
// others reach it only through their relays, so for the implicit routes
// nats-server would otherwise open around them it names a closed port.
func Advertise(i int) string { return Host(i) + ":1" }

// Connect opens a client on node i (in process), closed at the end.
func (c *Cluster) Connect(i int) *nats.Conn {
	c.t.Helper()
	nc, err := c.Nodes[i].Connect(fmt.Sprintf("test-n%d", i))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(nc.Close)
	return nc
}

// ClientURL is node i's client listener with the test user's password
// (tls://; its CA is CAFile).
func (c *Cluster) ClientURL(i int) string {
	u, err := url.Parse(c.Nodes[i].ClientURL())
	if err != nil {
		c.t.Fatal(err)
	}
	u.User = url.UserPassword(ClientUser, c.pass)
	return u.String()
}
