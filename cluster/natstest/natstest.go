// Package natstest starts a NATS JetStream cluster of embedded nodes for
// tests: node i listens on 127.0.0.(i+1), and every route between two
// nodes passes through a TCP relay the test controls, so that it can cut a
// node off (Cut) and heal it (Heal). Everything started is stopped by
// handle when the test ends.
package natstest

import (
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
)

// Cluster is a running test cluster.
type Cluster struct {
	t     testing.TB
	Nodes []*natsnode.Node
	// relays[i][j] carries node i's route to node j.
	relays [][]*Relay
	mu     sync.Mutex
	addrs  []string // each node's bound route listener
}

// Host returns the loopback address of node i.
func Host(i int) string { return fmt.Sprintf("127.0.0.%d", i+1) }

// Start starts n nodes (n ≥ 3 for R3) and waits until JetStream has a
// meta leader.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	c := &Cluster{t: t, Nodes: make([]*natsnode.Node, n), relays: make([][]*Relay, n), addrs: make([]string, n)}
	for i := range n {
		c.relays[i] = make([]*Relay, n)
		for j := range n {
			if i == j {
				continue
			}
			j := j
			r, err := NewRelay(Host(i), func() string { c.mu.Lock(); defer c.mu.Unlock(); return c.addrs[j] })
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(r.Close)
			c.relays[i][j] = r
		}
	}
	dir := t.TempDir()
	for i := range n {
		c.StartNode(i, fmt.Sprintf("%s/n%d", dir, i))
	}
	c.WaitMeta(30 * time.Second)
	return c
}

// StartNode starts (or restarts, with the same store) node i.
func (c *Cluster) StartNode(i int, storeDir string) {
	c.t.Helper()
	var routes []string
	for j, r := range c.relays[i] {
		if j != i {
			routes = append(routes, r.Addr())
		}
	}
	node, err := natsnode.Start(natsnode.Config{Name: fmt.Sprintf("n%d", i), ClusterName: "fgtest",
		ClientAddr: Host(i) + ":0", ClusterAddr: Host(i) + ":0",
		// The others reach this node only through their relays: what it
		// would advertise for implicit routes is a closed port.
		Advertise: Host(i) + ":1",
		Routes:    routes, StoreDir: storeDir})
	if err != nil {
		c.t.Fatal(err)
	}
	c.mu.Lock()
	c.Nodes[i], c.addrs[i] = node, node.ClusterAddr()
	c.mu.Unlock()
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

// Cut cuts every route of node i (both directions) until Heal.
func (c *Cluster) Cut(i int) {
	for j := range c.Nodes {
		if j != i {
			c.relays[i][j].Cut()
			c.relays[j][i].Cut()
		}
	}
}

// Heal lets node i's routes through again (the nodes redial within about
// a second).
func (c *Cluster) Heal(i int) {
	for j := range c.Nodes {
		if j != i {
			c.relays[i][j].Heal()
			c.relays[j][i].Heal()
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
