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
	"io"
	"net"
	"net/url"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
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

// Mesh is the routes of n nodes, each through a relay of its own: node
// i reaches node j through Route(i, j). Cut and Heal act on every route
// of a node.
type Mesh struct {
	// relays[i][j] carries node i's route to node j.
	relays [][]*Relay
	mu     sync.Mutex
	addrs  []string // each node's route listener, once known
}

// NewMesh starts the relays of n nodes; SetTarget tells where node j
// listens for routes (before that its relays refuse).
func NewMesh(t testing.TB, n int) *Mesh {
	t.Helper()
	m := &Mesh{relays: make([][]*Relay, n), addrs: make([]string, n)}
	for i := range n {
		m.relays[i] = make([]*Relay, n)
		for j := range n {
			if i == j {
				continue
			}
			r, err := NewRelay(Host(i), func() string { m.mu.Lock(); defer m.mu.Unlock(); return m.addrs[j] })
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(r.Close)
			m.relays[i][j] = r
		}
	}
	return m
}

// SetTarget sets node j's route listener.
func (m *Mesh) SetTarget(j int, addr string) {
	m.mu.Lock()
	m.addrs[j] = addr
	m.mu.Unlock()
}

// Routes are the addresses node i dials to reach the others.
func (m *Mesh) Routes(i int) []string {
	var routes []string
	for j, r := range m.relays[i] {
		if j != i {
			routes = append(routes, r.Addr())
		}
	}
	return routes
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

// Cut cuts every route of node i (both directions) until Heal.
func (m *Mesh) Cut(i int) {
	for j := range m.relays {
		if j != i {
			m.relays[i][j].Cut()
			m.relays[j][i].Cut()
		}
	}
}

// Heal lets node i's routes through again (the nodes redial within about
// a second).
func (m *Mesh) Heal(i int) {
	for j := range m.relays {
		if j != i {
			m.relays[i][j].Heal()
			m.relays[j][i].Heal()
		}
	}
}

// Relay forwards TCP connections to a target; Cut closes them and refuses
// new ones until Heal.
type Relay struct {
	ln     net.Listener
	target func() string
	mu     sync.Mutex
	cut    bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// NewRelay listens on host (a free port) and forwards to target().
func NewRelay(host string, target func() string) (*Relay, error) {
	ln, err := net.Listen("tcp", host+":0")
	if err != nil {
		return nil, err
	}
	r := &Relay{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	r.wg.Add(1)
	go r.serve()
	return r, nil
}

// Addr is the relay's listen address.
func (r *Relay) Addr() string { return r.ln.Addr().String() }

func (r *Relay) serve() {
	defer r.wg.Done()
	for {
		in, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		cut := r.cut
		r.mu.Unlock()
		t := r.target()
		if cut || t == "" {
			in.Close()
			continue
		}
		out, err := net.DialTimeout("tcp", t, 2*time.Second)
		if err != nil {
			in.Close()
			continue
		}
		if !r.track(in, out) {
			continue
		}
		r.wg.Add(2)
		go r.pipe(in, out)
		go r.pipe(out, in)
	}
}

func (r *Relay) track(a, b net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cut || r.conns == nil {
		a.Close()
		b.Close()
		return false
	}
	r.conns[a], r.conns[b] = struct{}{}, struct{}{}
	return true
}

func (r *Relay) pipe(dst, src net.Conn) {
	defer r.wg.Done()
	_, _ = io.Copy(dst, src)
	dst.Close()
	src.Close()
	r.mu.Lock()
	delete(r.conns, dst)
	delete(r.conns, src)
	r.mu.Unlock()
}

// Cut closes the relayed connections and refuses new ones.
func (r *Relay) Cut() {
	r.mu.Lock()
	r.cut = true
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
}

// Heal accepts connections again.
func (r *Relay) Heal() {
	r.mu.Lock()
	r.cut = false
	r.mu.Unlock()
}

// Close stops the relay and waits for its goroutines.
func (r *Relay) Close() {
	r.ln.Close()
	r.Cut()
	r.mu.Lock()
	r.conns = nil
	r.mu.Unlock()
	r.wg.Wait()
}
