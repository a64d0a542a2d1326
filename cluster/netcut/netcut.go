// Package netcut relays TCP connections through relays a program
// controls, to cut links and heal them: the NATS routes of a cluster's
// nodes in the tests (cluster/natstest) and in fleetsim's chaos scenario
// (partitions). It does not import testing: shipped commands link it.
package netcut

import (
	"io"
	"net"
	"sync"
	"time"
)

// Mesh is the routes of n nodes, each through a relay of its own: node
// i reaches node j through Route(i, j). Cut and Heal act on every route
// of a node.
type Mesh struct {
	// relays[i][j] carries node i's route to node j.
	relays [][]*Relay
	mu     sync.Mutex
	addrs  []string // each node's route listener, once known
}

// NewMesh starts the relays of n nodes, node i's on host(i) (free
// ports); SetTarget tells where node j listens for routes (before that its
// relays refuse). Close stops them.
func NewMesh(n int, host func(i int) string) (*Mesh, error) {
	m := &Mesh{relays: make([][]*Relay, n), addrs: make([]string, n)}
	for i := range n {
		m.relays[i] = make([]*Relay, n)
		for j := range n {
			if i == j {
				continue
			}
			r, err := NewRelay(host(i), func() string { m.mu.Lock(); defer m.mu.Unlock(); return m.addrs[j] })
			if err != nil {
				m.Close()
				return nil, err
			}
			m.relays[i][j] = r
		}
	}
	return m, nil
}

// Close stops every relay of the mesh.
func (m *Mesh) Close() {
	for _, row := range m.relays {
		for _, r := range row {
			if r != nil {
				r.Close()
			}
		}
	}
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
