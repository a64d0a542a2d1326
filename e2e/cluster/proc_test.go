package cluster

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/operator/client"
	fgserver "github.com/fleetgate/fleetgate/server"
)

// gatewayOf is the test helper view of a `fleetgate serve` process.
func gatewayOf(t *testing.T, dataDir string, p *server) *testenv.Gateway {
	t.Helper()
	g := &testenv.Gateway{DataDir: dataDir, Addrs: fgserver.Addrs(p.Addrs)}
	var err error
	if g.CA, err = ca.Load(dataDir, ca.Options{}); err != nil {
		t.Fatal(err)
	}
	if g.Admin, err = client.New("https://"+g.Addrs.API, client.FromDataDir(dataDir)); err != nil {
		t.Fatal(err)
	}
	return g
}

// procCluster is n `fleetgate serve --cluster-name` processes (embedded
// NATS) on one PKI, node i on 127.0.0.(i+1), each stopped by PID when the
// test ends.
type procCluster struct {
	t      *testing.T
	listen []string
	dirs   []string
	extra  []string // further serve flags of every node
	procs  []*server
	gws    []*testenv.Gateway
}

// startProcCluster starts n nodes one by one and waits until each is ready.
func startProcCluster(t *testing.T, n int, extra ...string) *procCluster {
	src := testenv.Init(t)
	c := &procCluster{t: t, listen: make([]string, n), dirs: make([]string, n), extra: extra,
		procs: make([]*server, n), gws: make([]*testenv.Gateway, n)}
	for i := range n {
		c.listen[i] = natstest.FreeAddr(t, natstest.Host(i))
		c.dirs[i] = filepath.Join(t.TempDir(), fmt.Sprint("node", i+1))
		if err := testenv.CopyDataDir(c.dirs[i], src); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		c.start(i)
	}
	for i := range n {
		c.ready(i)
	}
	return c
}

// start (re)starts node i on its data directory and route address.
func (c *procCluster) start(i int) {
	c.t.Helper()
	var routes []string
	for j := range c.listen {
		if j != i {
			routes = append(routes, c.listen[j])
		}
	}
	c.procs[i] = serve(c.t, c.dirs[i], append([]string{"--cluster-name", "proc", "--node-name", fmt.Sprint("node", i+1),
		"--nats-listen", c.listen[i], "--nats-routes", strings.Join(routes, ",")}, c.extra...)...)
	c.gws[i] = gatewayOf(c.t, c.dirs[i], c.procs[i])
}

// ready waits until node i answers /readyz 200.
func (c *procCluster) ready(i int) {
	c.t.Helper()
	testenv.Eventually(c.t, 60*time.Second, func() error {
		if code := c.gws[i].Ready(); code != http.StatusOK {
			return fmt.Errorf("node %d: /readyz %d", i+1, code)
		}
		return nil
	})
}

// Three `fleetgate serve --cluster-name` processes (embedded NATS, nothing
// else installed): SIGKILL node 3, and the two others still close a
// revoked device's session (revoked through node 1, connected to node 2);
// node 3, restarted on its data directory, catches up: it refuses the
// revoked device and accepts the other.
func TestClusterProcessesNodeKilled(t *testing.T) {
	c := startProcCluster(t, 3)
	procs, gws, ready := c.procs, c.gws, c.ready
	revoked := deviceCert(t, gws[0].EnrollDevice(t, "proc-revoked", "fleet"))
	kept := deviceCert(t, gws[0].EnrollDevice(t, "proc-kept", "fleet"))
	lost := make(chan time.Time, 1)
	testenv.Eventually(t, 10*time.Second, func() error {
		_, err := gws[1].MQTT(t, "proc-revoked", revoked, func(o *paho.ClientOptions) {
			o.SetConnectionLostHandler(func(paho.Client, error) { lost <- time.Now() })
		})
		return err
	})

	kill(t, procs[2])
	// A JetStream leader on node 3 is replaced by an election among the
	// two others; until then they may briefly report not ready.
	ready(0)
	ready(1)
	t0 := time.Now()
	testenv.Eventually(t, 20*time.Second, func() error {
		_, err := gws[0].Admin.DeviceAction(context.Background(), "proc-revoked", "revoke", "e2e")
		return err
	})
	select {
	case at := <-lost:
		t.Logf("node 3 killed: revoke on node 1 → session closed on node 2 in %s", at.Sub(t0).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("with node 3 killed, a revocation through node 1 did not close the session on node 2")
	}

	c.start(2)
	ready(2)
	if _, err := gws[2].MQTT(t, "proc-revoked", revoked); err == nil {
		t.Fatal("node 3, restarted, accepted a device revoked while it was down")
	}
	if _, err := gws[2].MQTT(t, "proc-kept", kept); err != nil {
		t.Fatalf("node 3, restarted, refused an active device: %v", err)
	}
}
