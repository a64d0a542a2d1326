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

// Three `fleetgate serve --cluster-name` processes (embedded NATS, nothing
// else installed): SIGKILL node 3, and the two others still close a
// revoked device's session (revoked through node 1, connected to node 2);
// node 3, restarted on its data directory, catches up: it refuses the
// revoked device and accepts the other.
func TestClusterProcessesNodeKilled(t *testing.T) {
	src := testenv.Init(t)
	const n = 3
	listen := make([]string, n)
	dirs := make([]string, n)
	for i := range n {
		listen[i] = natstest.FreeAddr(t, natstest.Host(i))
		dirs[i] = filepath.Join(t.TempDir(), fmt.Sprint("node", i+1))
		if err := testenv.CopyDataDir(dirs[i], src); err != nil {
			t.Fatal(err)
		}
	}
	start := func(i int) *server {
		var routes []string
		for j := range n {
			if j != i {
				routes = append(routes, listen[j])
			}
		}
		return serve(t, dirs[i], "--cluster-name", "proc", "--node-name", fmt.Sprint("node", i+1),
			"--nats-listen", listen[i], "--nats-routes", strings.Join(routes, ","))
	}
	procs := make([]*server, n)
	gws := make([]*testenv.Gateway, n)
	for i := range n {
		procs[i] = start(i)
		gws[i] = gatewayOf(t, dirs[i], procs[i])
	}
	ready := func(i int) {
		t.Helper()
		testenv.Eventually(t, 60*time.Second, func() error {
			if code := gws[i].Ready(); code != http.StatusOK {
				return fmt.Errorf("node %d: /readyz %d", i+1, code)
			}
			return nil
		})
	}
	for i := range n {
		ready(i)
	}
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

	procs[2] = start(2)
	gws[2] = gatewayOf(t, dirs[2], procs[2])
	ready(2)
	if _, err := gws[2].MQTT(t, "proc-revoked", revoked); err == nil {
		t.Fatal("node 3, restarted, accepted a device revoked while it was down")
	}
	if _, err := gws[2].MQTT(t, "proc-kept", kept); err != nil {
		t.Fatalf("node 3, restarted, refused an active device: %v", err)
	}
}
