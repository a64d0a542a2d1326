package bench

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"text/template"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

//go:embed mosquitto.conf.tmpl
var mosquittoConfTmpl string

//go:embed mosquitto.acl.tmpl
var mosquittoACLTmpl string

// Broker is one running broker process, started by the harness and stopped
// by its PID.
type Broker struct {
	Name    string // "fleetgate", "mosquitto", "mosquitto-q100000" or "nats"
	MQTT    string // host:port
	API     string // fleetgate: enrollment/admin API host:port
	Metrics string
	PID     int
	// Nodes are a cluster's nodes, node i on 127.0.0.<i+1> (MQTT, API and
	// PID above are node 1's); nil for a broker of one process.
	Nodes []*Broker

	proc  *fleetproc.Proc // nil for a gateway in this process (profiles)
	close func()          // a cluster started as a whole: stops it
	// a cluster node's: SIGKILL, and start again (same addresses)
	kill    func() error
	restart func(context.Context) error
	running func() bool // a node whose process another harness holds
}

// PIDs are the broker's processes: its nodes' for a cluster.
func (b *Broker) PIDs() []int {
	if b.Nodes == nil {
		return []int{b.PID}
	}
	pids := make([]int, len(b.Nodes))
	for i, n := range b.Nodes {
		pids[i] = n.PID
	}
	return pids
}

// subNode is where a fan-in's subscriber connects: a cluster's last node.
func (b *Broker) subNode() *Broker { return b.node(len(b.Nodes) - 1) }

// pubNode is where fan-in publisher i connects: a cluster's nodes but the
// last, in turn, so that every message crosses nodes.
func (b *Broker) pubNode(i int) *Broker {
	if len(b.Nodes) < 2 {
		return b
	}
	return b.Nodes[i%(len(b.Nodes)-1)]
}

// node is node i (modulo their number) of a cluster, or b itself.
func (b *Broker) node(i int) *Broker {
	if len(b.Nodes) == 0 {
		return b
	}
	return b.Nodes[(i%len(b.Nodes)+len(b.Nodes))%len(b.Nodes)]
}

// Procs records every process the harness started, so that an interrupted
// run still stops them all (by PID).
type Procs struct {
	mu   sync.Mutex
	live map[int]*Broker
}

func (p *Procs) add(b *Broker) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.live == nil {
		p.live = map[int]*Broker{}
	}
	p.live[b.PID] = b
}

func (p *Procs) remove(pid int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.live, pid)
}

// StopAll stops every process still running.
func (p *Procs) StopAll() {
	p.mu.Lock()
	bs := make([]*Broker, 0, len(p.live))
	for _, b := range p.live {
		bs = append(bs, b)
	}
	p.mu.Unlock()
	for _, b := range bs {
		b.Stop()
	}
}

// track records a started process as the broker name.
func (p *Procs) track(name string, proc *fleetproc.Proc) *Broker {
	b := &Broker{Name: name, PID: proc.PID, proc: proc}
	p.add(b)
	return b
}

// Stop sends SIGTERM to the broker's PID, then SIGKILL after 10 s. The
// error says why it did not end cleanly on SIGTERM.
func (b *Broker) Stop() error {
	if b == nil {
		return nil
	}
	if procs != nil {
		defer procs.remove(b.PID)
	}
	switch {
	case b.close != nil:
		b.close()
		return nil
	case b.Nodes != nil:
		var errs []error
		for _, n := range b.Nodes {
			errs = append(errs, n.Stop())
		}
		return errors.Join(errs...)
	case b.proc == nil:
		return nil
	}
	return b.proc.Stop(10 * time.Second)
}

// Exited reports whether the process (a cluster: any node) has ended.
func (b *Broker) Exited() bool {
	for _, n := range b.Nodes {
		if n.Exited() {
			return true
		}
	}
	if b.running != nil {
		return !b.running()
	}
	return b.proc != nil && b.proc.Exited()
}

var procs *Procs

// FleetgateOptions are the serve flags the harness sets.
var FleetgateServeFlags = []string{
	// Per-device limits raised: the fan-in scenarios publish far above a
	// sensor's default 100 msg/s, and all load comes from 127.0.0.1.
	"--msg-rate", "1e9", "--msg-burst", "1000000000", "--byte-rate", "1e12",
	"--max-pending", "4096", "--max-pending-per-ip", "4096",
	// Log refusals and errors only, like mosquitto with
	// connection_messages false below.
	"--log-level", "warn",
}

// StartFleetgate runs `fleetgate serve` on loopback ports chosen by the
// kernel and waits for its address file.
func (e *Env) StartFleetgate(ctx context.Context) (*Broker, error) {
	logPath := filepath.Join(e.Work, "fleetgate.log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	p, err := fleetproc.Start(ctx, fleetproc.Options{Bin: e.FleetgateBin, DataDir: e.DataDir(),
		Args: slices.Concat(FleetgateServeFlags, e.ExtraServeFlags), AddrFile: filepath.Join(e.Work, "fleetgate.addr"),
		Log: lf, Timeout: 60 * time.Second, DieWithParent: true})
	if err != nil {
		return nil, fmt.Errorf("%w; see %s", err, logPath)
	}
	b := procs.track("fleetgate", p)
	if err := b.setAddrs(p.Addrs); err != nil {
		b.Stop()
		return nil, err
	}
	return b, nil
}

// setAddrs takes fleetgate's addresses; the harness needs both listeners.
func (b *Broker) setAddrs(a fleetproc.Addrs) error {
	if a.MQTT == "" || a.API == "" {
		return errors.New("address file without mqtt/api")
	}
	b.MQTT, b.API, b.Metrics = a.MQTT, a.API, a.Metrics
	return nil
}

// MosquittoBin is the broker compared against.
var MosquittoBin = "/usr/sbin/mosquitto"

func freePort() (int, error) { return freePortOn("127.0.0.1") }

// freePortOn is a port the kernel had free on host.
func freePortOn(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// writeMosquittoConfig writes the mosquitto configuration for port.
func (e *Env) writeMosquittoConfig(name string, port, maxQueued int) (string, error) {
	dir := filepath.Join(e.Work, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	// cafile: root and issuing CA of fleetgate's PKI, so that clients may
	// send their chain (leaf + issuing) as fleetgate's SDK does.
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
	data := map[string]any{
		"Port": port, "CAFile": caFile,
		"CertFile": filepath.Join(e.DataDir(), "tls", "server.crt"), "KeyFile": filepath.Join(e.DataDir(), "tls", "server.key"),
		"ACLFile": filepath.Join(dir, "acl"), "Backend": BackendName, "Root": os.Getuid() == 0, "MaxQueued": maxQueued,
	}
	for name, src := range map[string]string{"mosquitto.conf": mosquittoConfTmpl, "acl": mosquittoACLTmpl} {
		var buf bytes.Buffer
		if err := template.Must(template.New(name).Parse(src)).Execute(&buf, data); err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, name), buf.Bytes(), 0o644); err != nil {
			return "", err
		}
	}
	return filepath.Join(dir, "mosquitto.conf"), nil
}

// MosquittoDefaultQueue is mosquitto's default max_queued_messages;
// MosquittoRaisedQueue the value of the "mosquitto-q100000" run.
const (
	MosquittoDefaultQueue = 1000
	MosquittoRaisedQueue  = 100000
)

// StartMosquitto runs mosquitto in the foreground with the harness's
// configuration, as broker name with max_queued_messages maxQueued, and
// waits until it accepts connections.
func (e *Env) StartMosquitto(ctx context.Context, name string, maxQueued int) (*Broker, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	conf, err := e.writeMosquittoConfig(name, port, maxQueued)
	if err != nil {
		return nil, err
	}
	return e.spawnPeer(ctx, name, MosquittoBin, []string{"-c", conf}, fmt.Sprintf("127.0.0.1:%d", port))
}

// spawnPeer starts a peer broker's process (never outliving the harness)
// and waits until its MQTT address (host:port) accepts connections.
func (e *Env) spawnPeer(ctx context.Context, name, bin string, args []string, addr string) (*Broker, error) {
	logPath := filepath.Join(e.Work, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	p, err := fleetproc.Spawn(bin, args, lf, true)
	if err != nil {
		return nil, err
	}
	b := procs.track(name, p)
	b.MQTT = addr
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", b.MQTT, time.Second)
		if err == nil {
			c.Close()
			return b, nil
		}
		if b.Exited() {
			return nil, fmt.Errorf("%s exited at start; see %s", name, logPath)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.Stop()
			return nil, fmt.Errorf("%s did not listen in 60 s; see %s", name, logPath)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
