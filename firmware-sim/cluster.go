package sim

// fleetsim --cluster N: N `fleetgate serve` processes with embedded NATS
// on 127.0.0.1..N (docs/cluster.md, "Running 3 nodes with fleetsim"),
// one data directory initialised once and copied per node, each process
// stopped by the handle (PID) that started it.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fleetgate/fleetgate/cluster/netcut"
	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// clusterNode is one `fleetgate serve --cluster-name` process.
type clusterNode struct {
	name    string
	host    string // 127.0.0.<i+1>
	dataDir string
	logFile string
	listen  string // its NATS route address
	routes  []string
	// Addrs are kept across restarts: a restarted node binds the same
	// MQTT, API and metrics addresses.
	addrs fleetproc.Addrs

	mu     sync.Mutex
	proc   *fleetproc.Proc
	paused bool
}

// clusterProcs is the cluster fleetsim started. Close stops every process
// it started, whatever happened before.
type clusterProcs struct {
	bin, name string
	extra     []string // further serve flags of every node
	onStart   func(pids []int)
	nodes     []*clusterNode
	// mesh relays every node's NATS routes (cluster/netcut), so that the
	// chaos scenario can cut a node off (partition) and heal it.
	mesh *netcut.Mesh
	// PIDs of every process started, in order (tests check none is left).
	mu      sync.Mutex
	started []int
}

// freePort returns an address on host with a port the kernel had free.
func freePort(host string) (string, error) {
	l, err := net.Listen("tcp", host+":0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startCluster initialises one data directory, copies it to n nodes
// before any serves (they share the PKI), and starts them one by one.
func startCluster(ctx context.Context, bin, workDir string, n int, extra []string, onStart func([]int)) (*clusterProcs, error) {
	c := &clusterProcs{bin: bin, name: "fleetsim", extra: extra, onStart: onStart}
	src := filepath.Join(workDir, "gateway")
	args := []string{"init", "--data-dir", src}
	for i := range n {
		args = append(args, "--host", fmt.Sprintf("127.0.0.%d", i+1))
	}
	if seeded(src) {
		// StartCluster copied an initialised data directory there
	} else if out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("fleetgate init: %v: %s", err, out)
	}
	for i := range n {
		nd := &clusterNode{name: fmt.Sprintf("node%d", i+1), host: fmt.Sprintf("127.0.0.%d", i+1)}
		nd.dataDir = filepath.Join(workDir, nd.name)
		nd.logFile = filepath.Join(workDir, nd.name+".log")
		if err := copyDataDir(nd.dataDir, src); err != nil {
			return nil, fmt.Errorf("copy data directory to %s: %w", nd.name, err)
		}
		var err error
		if nd.listen, err = freePort(nd.host); err != nil {
			return nil, err
		}
		nd.addrs = fleetproc.Addrs{MQTT: nd.host + ":0", API: nd.host + ":0", Metrics: nd.host + ":0"}
		c.nodes = append(c.nodes, nd)
	}
	// Each node dials the others through its own relays, and advertises a
	// closed port, so that nats-server opens no route around the relays.
	mesh, err := netcut.NewMesh(n, func(i int) string { return c.nodes[i].host })
	if err != nil {
		return nil, err
	}
	c.mesh = mesh
	for i, nd := range c.nodes {
		mesh.SetTarget(i, nd.listen)
	}
	for i, nd := range c.nodes {
		nd.routes = mesh.Routes(i)
	}
	for _, nd := range c.nodes {
		if err := c.start(ctx, nd); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// start runs the node's `fleetgate serve`, its output appended to its log.
func (c *clusterProcs) start(ctx context.Context, nd *clusterNode) error {
	logf, err := os.OpenFile(nd.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := append([]string{"--metrics-addr", nd.addrs.Metrics, "--log-level", "info",
		"--cluster-name", c.name, "--node-name", nd.name,
		"--nats-listen", nd.listen, "--nats-advertise", nd.host + ":1", "--nats-routes", strings.Join(nd.routes, ",")}, c.extra...)
	p, err := fleetproc.Start(ctx, fleetproc.Options{Bin: c.bin, DataDir: nd.dataDir, MQTTAddr: nd.addrs.MQTT, APIAddr: nd.addrs.API,
		Args: args, AddrFile: filepath.Join(nd.dataDir, "addrs.json"), Log: logf, DieWithParent: true, Timeout: 60 * time.Second})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%s: %w (log: %s)", nd.name, err, nd.logFile)
	}
	c.mu.Lock()
	c.started = append(c.started, p.PID)
	pids := append([]int(nil), c.started...)
	c.mu.Unlock()
	if c.onStart != nil {
		c.onStart(pids)
	}
	nd.mu.Lock()
	nd.proc, nd.paused = p, false
	nd.addrs = p.Addrs
	nd.mu.Unlock()
	return nil
}

// waitReady waits until every running node answers /readyz 200 (the
// cluster formed, its directory proven fresh).
func (c *clusterProcs) waitReady(ctx context.Context, d time.Duration, nodes ...*clusterNode) error {
	if len(nodes) == 0 {
		nodes = c.nodes
	}
	var notReady []string
	ok := waitFor(ctx, d, func() bool {
		notReady = notReady[:0]
		for _, nd := range nodes {
			if !nd.ready() {
				notReady = append(notReady, nd.name)
			}
		}
		return len(notReady) == 0
	})
	if !ok {
		return fmt.Errorf("not ready within %s: %v", d, notReady)
	}
	return nil
}

func (nd *clusterNode) ready() bool {
	cl := &http.Client{Timeout: 2 * time.Second}
	resp, err := cl.Get("http://" + nd.addrs.Metrics + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (nd *clusterNode) running() *fleetproc.Proc {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.proc == nil || nd.proc.Exited() {
		return nil
	}
	return nd.proc
}

// pid is the node's current process ID (0: not running).
func (nd *clusterNode) pid() int {
	if p := nd.running(); p != nil {
		return p.PID
	}
	return 0
}

// kill sends SIGKILL to the node's process and reaps it.
func (nd *clusterNode) kill() error {
	p := nd.running()
	if p == nil {
		return nil
	}
	if nd.isPaused() {
		_ = p.Signal(syscall.SIGCONT)
	}
	return p.Kill()
}

// pause stops (SIGSTOP) or continues (SIGCONT) the node's process.
func (nd *clusterNode) pause(stop bool) error {
	p := nd.running()
	if p == nil {
		return errors.New(nd.name + " is not running")
	}
	sig := syscall.SIGCONT
	if stop {
		sig = syscall.SIGSTOP
	}
	if err := p.Signal(sig); err != nil {
		return err
	}
	nd.mu.Lock()
	nd.paused = stop
	nd.mu.Unlock()
	return nil
}

func (nd *clusterNode) isPaused() bool {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	return nd.paused
}

// PIDs lists every process this cluster started.
func (c *clusterProcs) PIDs() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]int(nil), c.started...)
}

// Close stops every node process this cluster started (SIGTERM, SIGKILL
// after 10 s), a paused one continued first.
func (c *clusterProcs) Close() {
	var wg sync.WaitGroup
	for _, nd := range c.nodes {
		p := nd.running()
		if p == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if nd.isPaused() {
				_ = p.Signal(syscall.SIGCONT)
			}
			_ = p.Stop(10 * time.Second)
		}()
	}
	wg.Wait()
	if c.mesh != nil {
		c.mesh.Close()
	}
}

// copyDataDir copies a data directory (keys stay private: each file keeps
// its mode).
func copyDataDir(dst, src string) error {
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		return err
	}
	return filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dst, p)
		if fi, err := os.Stat(filepath.Join(src, rel)); err == nil {
			return os.Chmod(p, fi.Mode().Perm())
		}
		return nil
	})
}
