package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/internal/fleetproc"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

var (
	natsOnce sync.Once
	natsBin  string
	natsErr  error
)

// natsServerBin builds nats-server from the Go module (a go.mod tool, as
// `make bench` builds bin/nats-server) once per test binary run.
func natsServerBin(t testing.TB) string {
	t.Helper()
	natsOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fleetgate-nats-bin-")
		if err != nil {
			natsErr = err
			return
		}
		extraBinDirs = append(extraBinDirs, dir)
		natsBin = filepath.Join(dir, "nats-server")
		if out, err := exec.Command("go", "build", "-o", natsBin, "github.com/nats-io/nats-server/v2").CombinedOutput(); err != nil {
			natsErr = fmt.Errorf("go build nats-server: %v\n%s", err, out)
		}
	})
	if natsErr != nil {
		t.Fatal(natsErr)
	}
	return natsBin
}

// natsProcs are n nats-server processes with JetStream (sync before every
// acknowledgement) in one cluster, server i on 127.0.0.(i+1); each is
// stopped by PID when the test ends.
type natsProcs struct {
	procs []*fleetproc.Proc
	urls  []string // client URL of each
	mons  []string // monitoring address of each (host:port)
}

func startNATSProcs(t *testing.T, n int) *natsProcs {
	t.Helper()
	bin := natsServerBin(t)
	c := &natsProcs{procs: make([]*fleetproc.Proc, n), urls: make([]string, n), mons: make([]string, n)}
	routes := make([]string, n)
	client := make([]string, n)
	for i := range n {
		client[i] = natstest.FreeAddr(t, natstest.Host(i))
		routes[i] = natstest.FreeAddr(t, natstest.Host(i))
		c.mons[i] = natstest.FreeAddr(t, natstest.Host(i))
		c.urls[i] = "nats://" + client[i]
	}
	for i := range n {
		dir := filepath.Join(t.TempDir(), fmt.Sprint("nats", i+1))
		var others []string
		for j := range n {
			if j != i {
				others = append(others, fmt.Sprintf("%q", "nats-route://"+routes[j]))
			}
		}
		conf := fmt.Sprintf("server_name: nats%d\nlisten: %q\nhttp: %q\njetstream {\n  store_dir: %q\n  sync_interval: always\n}\n"+
			"cluster {\n  name: fgext\n  listen: %q\n  routes: [%s]\n}\n", i+1, client[i], c.mons[i], filepath.Join(dir, "js"), routes[i], strings.Join(others, ", "))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "nats.conf")
		if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		p, err := fleetproc.Spawn(bin, []string{"-c", path}, nil, true)
		if err != nil {
			t.Fatal(err)
		}
		c.procs[i] = p
		t.Cleanup(func() {
			if err := p.Stop(10 * time.Second); err != nil && !strings.Contains(err.Error(), "signal: killed") {
				t.Logf("nats%d (pid %d): %v", i+1, p.PID, err)
			}
		})
	}
	return c
}

// Issue test 5: SIGKILL a NATS server under QoS 1 load. Three nats-server
// processes (JetStream, sync always) and three `fleetgate serve
// --nats-url` nodes, node i on NATS server i first. Devices publish
// numbered QoS 1 telemetry at a steady rate through nodes 1 and 2; a
// persistent service on node 3 subscribes. NATS server 1 is SIGKILLed
// mid-load (node 1's client reconnects to another server). Then a device
// on node 2 is revoked through node 1's API: its session on node 2 is
// closed and it cannot reconnect. At the end every message a device got a
// PUBACK for reached the service (duplicates allowed).
func TestClusterNATSServerKilledUnderQoS1Load(t *testing.T) {
	nats := startNATSProcs(t, 3)
	src := testenv.Init(t)
	const n = 3
	procs := make([]*server, n)
	gws := make([]*testenv.Gateway, n)
	for i := range n {
		dir := filepath.Join(t.TempDir(), fmt.Sprint("node", i+1))
		if err := testenv.CopyDataDir(dir, src); err != nil {
			t.Fatal(err)
		}
		urls := []string{nats.urls[i]}
		for j := range n {
			if j != i {
				urls = append(urls, nats.urls[j])
			}
		}
		procs[i] = serve(t, dir, "--nats-url", strings.Join(urls, ","), "--nats-allow-plaintext", "--node-name", fmt.Sprint("node", i+1))
		gws[i] = gatewayOf(t, dir, procs[i])
	}
	for i := range n {
		testenv.Eventually(t, 90*time.Second, func() error {
			if code := gws[i].Ready(); code != 200 {
				return fmt.Errorf("node %d: /readyz %d", i+1, code)
			}
			return nil
		})
	}

	// The service: a persistent session on node 3.
	var (
		mu   sync.Mutex
		recv = map[string]int{} // "device/seq" → times received
	)
	svcCert := gws[0].Service(t, "svc-nk")
	testenv.Eventually(t, 20*time.Second, func() error {
		// Like a real service, it reconnects (its persistent session keeps
		// the subscription): a node whose view of revocations goes stale
		// past the second bound while JetStream elects new leaders closes
		// its sessions (docs/cluster.md, "Fail closed").
		c, err := gws[2].MQTT(t, "svc-nk", &svcCert, func(o *paho.ClientOptions) {
			o.SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(time.Second).
				SetConnectionLostHandler(func(_ paho.Client, err error) { t.Logf("service: connection lost: %v", err) })
		})
		if err != nil {
			return err
		}
		tok := c.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
			mu.Lock()
			recv[string(m.Payload())]++
			mu.Unlock()
		})
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			c.Disconnect(0)
			return fmt.Errorf("subscribe: %v", tok.Error())
		}
		return nil
	})

	// Devices: half on node 1, half on node 2.
	const devices = 6
	type dev struct {
		id   string
		node int
		c    atomic.Pointer[paho.Client] // the current connection's client
		cert *tls.Certificate
		lost chan struct{}
	}
	devs := make([]*dev, devices)
	// connect connects d to its node. No paho auto-reconnect: on a
	// reconnect paho v3 resends the publishes it holds and completes their
	// original tokens without error before any PUBACK (claimID), which
	// would count unacknowledged messages as acknowledged. A lost
	// connection here fails its pending tokens, and the load loop dials a
	// new client, as a device's firmware would.
	connect := func(d *dev) error {
		c, err := gws[d.node].MQTT(t, d.id, d.cert, func(o *paho.ClientOptions) {
			o.SetConnectionLostHandler(func(_ paho.Client, err error) {
				t.Logf("%s: connection lost: %v", d.id, err)
				select {
				case d.lost <- struct{}{}:
				default:
				}
			})
		})
		if err == nil {
			d.c.Store(&c)
		}
		return err
	}
	for i := range devices {
		d := &dev{id: fmt.Sprint("nk5-", i), node: i % 2, lost: make(chan struct{}, 1)}
		d.cert = deviceCert(t, gws[0].EnrollDevice(t, d.id, "fleet"))
		testenv.Eventually(t, 20*time.Second, func() error { return connect(d) })
		devs[i] = d
	}

	victim := devs[1] // revoked mid-load; reconnected until then
	var revoking atomic.Bool

	// The load: each device publishes every 50 ms; a message is acknowledged
	// once its token completes without error (PUBACK), whenever that is.
	var (
		ackMu   sync.Mutex
		acked   []string
		sent    int
		waiters sync.WaitGroup
	)
	stop := make(chan struct{})
	var loops sync.WaitGroup
	for _, d := range devs {
		loops.Add(1)
		go func() {
			defer loops.Done()
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for seq := 1; seq <= 2000; seq++ { // bounded: 100 s at most
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				c := *d.c.Load()
				if !c.IsConnected() {
					if seq%20 == 0 && (d != victim || !revoking.Load()) { // once a second
						_ = connect(d)
					}
					continue
				}
				msg := fmt.Sprintf("%s/%d", d.id, seq)
				tok := c.Publish("devices/"+d.id+"/telemetry", 1, false, msg)
				ackMu.Lock()
				sent++
				ackMu.Unlock()
				waiters.Add(1)
				go func() {
					defer waiters.Done()
					if tok.WaitTimeout(60*time.Second) && tok.Error() == nil {
						ackMu.Lock()
						acked = append(acked, msg)
						ackMu.Unlock()
					}
				}()
			}
		}()
	}
	stopLoad := sync.OnceFunc(func() { close(stop); loops.Wait() })
	defer stopLoad()
	ackedNow := func() int { ackMu.Lock(); defer ackMu.Unlock(); return len(acked) }

	// Mid-load: SIGKILL NATS server 1 (node 1's), by PID.
	testenv.Eventually(t, 30*time.Second, func() error {
		if a := ackedNow(); a < 200 {
			return fmt.Errorf("%d acknowledged so far", a)
		}
		return nil
	})
	before := ackedNow()
	if err := nats.procs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("NATS server 1 (pid %d) SIGKILLed after %d acknowledged messages", nats.procs[0].PID, before)
	// The load goes on until another 200 are acknowledged (through node
	// 1's reconnected client and node 2).
	testenv.Eventually(t, 60*time.Second, func() error {
		if a := ackedNow(); a < before+200 {
			return fmt.Errorf("%d acknowledged since the kill", a-before)
		}
		return nil
	})

	// Revocations still close sessions: a device on node 2, revoked
	// through node 1.
	testenv.Eventually(t, 30*time.Second, func() error {
		if !(*victim.c.Load()).IsConnected() {
			return fmt.Errorf("%s not connected", victim.id)
		}
		return nil
	})
	revoking.Store(true)
	select { // a loss before the revocation is not the revocation's
	case <-victim.lost:
	default:
	}
	var t0 time.Time
	testenv.Eventually(t, 30*time.Second, func() error {
		t0 = time.Now()
		_, err := gws[0].Admin.DeviceAction(context.Background(), victim.id, "revoke", "e2e test 5")
		return err
	})
	select {
	case <-victim.lost:
		t.Logf("revoked %s through node 1 (its NATS server killed): session on node 2 closed %s after the call", victim.id, time.Since(t0).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatalf("revoking %s through node 1 did not close its session on node 2", victim.id)
	}
	// Closed by the revocation, not by anything else (a stale node's 0x8B).
	// (/metrics may answer slowly while the node's store is: retried.)
	testenv.Eventually(t, 60*time.Second, func() error {
		m, err := testenv.HTTPGet("http://" + gws[1].Addrs.Metrics + "/metrics")
		if err != nil {
			return err
		}
		if !strings.Contains(m, `fleetgate_broker_sessions_closed_total{reason="revoked"} 1`) {
			return fmt.Errorf("node 2 closed no session as revoked:\n%s", grepLines(m, "fleetgate_broker_sessions_closed_total"))
		}
		return nil
	})
	for i := range n {
		if _, err := gws[i].MQTT(t, victim.id, victim.cert); err == nil {
			t.Errorf("node %d accepted revoked %s", i+1, victim.id)
		}
	}

	stopLoad()
	waiters.Wait() // each waits 60 s at most
	ackMu.Lock()
	ack := append([]string(nil), acked...)
	total := sent
	ackMu.Unlock()
	var missing []string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		missing = missing[:0]
		mu.Lock()
		for _, m := range ack {
			if recv[m] == 0 {
				missing = append(missing, m)
			}
		}
		mu.Unlock()
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
	}
	for i, g := range gws { // the second staleness bound is above the elections: none expected, not asserted
		if m, err := testenv.HTTPGet("http://" + g.Addrs.Metrics + "/metrics"); err == nil {
			if l := grepLines(m, `reason="cluster_stale"`); l != "" {
				t.Logf("node %d: %s", i+1, l)
			}
		}
	}
	mu.Lock()
	dups := 0
	for _, c := range recv {
		dups += max(c-1, 0)
	}
	got := len(recv)
	mu.Unlock()
	sort.Strings(missing)
	t.Logf("QoS 1 under the NATS kill: %d published, %d acknowledged (%d before the kill), %d distinct received by the service, %d duplicates, %d acknowledged lost %v",
		total, len(ack), before, got, dups, len(missing), missing[:min(len(missing), 10)])
	if len(missing) > 0 {
		t.Errorf("%d acknowledged QoS 1 messages never reached the service: %v", len(missing), missing[:min(len(missing), 20)])
		// What the stream holds, by server, and where each node's feed is.
		for i, mon := range nats.mons[1:] {
			if out, err := testenv.HTTPGet("http://" + mon + "/jsz?streams=true&consumers=true"); err == nil {
				t.Logf("nats%d /jsz: %s", i+2, out)
			}
		}
		for i, g := range gws {
			var feed []string
			m, _ := testenv.HTTPGet("http://" + g.Addrs.Metrics + "/metrics")
			for _, l := range strings.Split(m, "\n") {
				if strings.HasPrefix(l, "fleetgate_cluster_") {
					feed = append(feed, l)
				}
			}
			t.Logf("node %d: %s", i+1, strings.Join(feed, "; "))
		}
	}
}

// grepLines returns the lines of text that contain sub.
func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
