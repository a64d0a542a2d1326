package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
	fgserver "github.com/fleetgate/fleetgate/server"
)

// Cluster tests (issue 13): three in-process fleetgate nodes, each with
// an embedded NATS JetStream node, their routes through relays the test
// cuts. Node numbers in names and logs are 1-based, as in the issue.

func deviceCert(t *testing.T, d *devicesdk.Device) *tls.Certificate {
	t.Helper()
	tc, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := tc.GetClientCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func clusterDevices() int {
	if n, err := strconv.Atoi(os.Getenv("FLEETGATE_CLUSTER_DEVICES")); err == nil && n > 0 {
		return n
	}
	return 50 // the 200: FLEETGATE_CLUSTER_DEVICES=200
}

// Issue test 7: devices enrolled through node 1 and connected to node 2
// are revoked through node 1's API: each connection on node 2 is closed
// (time from the call measured), and a reconnect to any node is refused.
func TestClusterRevokeThroughNode1ClosesOnNode2(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	n1, n2 := c.Nodes[0], c.Nodes[1]
	n := clusterDevices()
	type conn struct {
		id   string
		cert *tls.Certificate
		lost chan time.Time
	}
	conns := make([]conn, n)
	for i := range conns {
		id := fmt.Sprintf("rev-%03d", i)
		d := n1.EnrollDevice(t, id, "fleet")
		cc := conn{id: id, cert: deviceCert(t, d), lost: make(chan time.Time, 1)}
		// The certificate issued on node 1 reaches node 2's directory
		// through the bucket within milliseconds; allow for a loaded
		// machine.
		testenv.Eventually(t, 10*time.Second, func() error {
			_, err := n2.MQTT(t, id, cc.cert, func(o *paho.ClientOptions) {
				o.SetConnectionLostHandler(func(paho.Client, error) { cc.lost <- time.Now() })
			})
			return err
		})
		conns[i] = cc
	}
	ctx := context.Background()
	var lat []time.Duration
	for _, cc := range conns {
		var t0 time.Time
		// A node whose view went stale (a loaded machine) refuses the
		// operator too, with 503 directory_stale: retried; any other
		// refusal fails the test.
		testenv.Eventually(t, 30*time.Second, func() error {
			t0 = time.Now()
			_, err := n1.Admin.DeviceAction(ctx, cc.id, "revoke", "e2e")
			if err != nil && !testenv.IsStale(err) {
				t.Fatal(err)
			}
			return err
		})
		select {
		case at := <-cc.lost:
			lat = append(lat, at.Sub(t0))
		case <-time.After(10 * time.Second):
			t.Fatalf("%s on node 2 not disconnected within 10s of its revocation on node 1", cc.id)
		}
	}
	slices.Sort(lat)
	t.Logf("revoke on node 1 → session closed on node 2, %d devices: p50 %s, p99 %s, max %s",
		n, lat[n/2].Round(10*time.Microsecond), lat[n*99/100].Round(10*time.Microsecond), lat[n-1].Round(10*time.Microsecond))
	for _, cc := range conns[:min(n, 5)] {
		for k, g := range c.Nodes {
			if _, err := g.MQTT(t, cc.id, cc.cert); err == nil {
				t.Fatalf("revoked %s reconnected to node %d", cc.id, k+1)
			}
		}
	}
}

// Issue test 8: two concurrent redemptions of one bootstrap token on two
// nodes give exactly one certificate.
func TestClusterTokenSingleUseAcrossNodes(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	for round := range 5 {
		id := fmt.Sprintf("tok-%d", round)
		tok := c.Nodes[round%3].Token(t, id, "fleet", time.Hour)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var ok, used int
		for k := 1; k <= 2; k++ {
			d := c.Nodes[k].Device(t, id)
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := d.EnrollWithToken(context.Background(), tok)
				mu.Lock()
				defer mu.Unlock()
				var ae *api.Error
				switch {
				case err == nil:
					ok++
				case errors.As(err, &ae) && (ae.Code == "token_used" || ae.Code == "conflict"):
					used++
				default:
					t.Errorf("round %d, node %d: %v", round, k+1, err)
				}
			}()
		}
		wg.Wait()
		if ok != 1 || used != 1 {
			t.Fatalf("round %d: %d certificates, %d refusals; want exactly one certificate", round, ok, used)
		}
	}
}

// Issue test 6 (with MQTT clients, the NATS routes of node 3 cut for a
// while): node 3 refuses new connections and reports not ready within the
// bound; the other nodes go on revoking; after the heal node 3 has caught
// up with no gap (the revoked device is refused, the others accepted).
func TestClusterPartitionedNodeFailsClosedAndCatchesUp(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	n1, n3 := c.Nodes[0], c.Nodes[2]
	const n = 10
	certs := make([]*tls.Certificate, n)
	for i := range certs {
		certs[i] = deviceCert(t, n1.EnrollDevice(t, fmt.Sprintf("part-%d", i), "fleet"))
	}
	testenv.Eventually(t, 10*time.Second, func() error { _, err := n3.MQTT(t, "part-0", certs[0]); return err })

	c.Mesh.Cut(2)
	cut := time.Now()
	testenv.Eventually(t, 5*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusServiceUnavailable {
			return fmt.Errorf("node 3 /readyz %d", code)
		}
		return nil
	})
	t.Logf("node 3 not ready %s after the cut (bound 1s)", time.Since(cut).Round(time.Millisecond))
	if _, err := n3.MQTT(t, "part-1", certs[1]); err == nil {
		t.Fatal("a node cut off from the cluster accepted a connection")
	}
	// Its operator API refuses too, and says why (an operator can go to
	// another node).
	if _, err := n3.Admin.DeviceAction(context.Background(), "part-0", "suspend", "e2e"); !testenv.IsStale(err) {
		t.Fatalf("operator call on the cut-off node: %v, want 503 directory_stale", err)
	}
	// The majority revokes the odd devices (a new JetStream leader may
	// have to be elected first).
	for i := 1; i < n; i += 2 {
		testenv.Eventually(t, 20*time.Second, func() error {
			_, err := n1.Admin.DeviceAction(context.Background(), fmt.Sprintf("part-%d", i), "revoke", "e2e")
			return err
		})
	}
	if code := n1.Ready(); code != http.StatusOK {
		t.Fatalf("node 1 (majority) /readyz %d during the partition", code)
	}
	time.Sleep(2 * time.Second) // partitioned for a while
	c.Mesh.Heal(2)
	healed := time.Now()
	testenv.Eventually(t, 30*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusOK {
			return fmt.Errorf("node 3 /readyz %d", code)
		}
		return nil
	})
	t.Logf("node 3 ready %s after the heal", time.Since(healed).Round(time.Millisecond))
	// Right after a heal JetStream may elect leaders again, and node 3 may
	// fail closed again for a moment (seen in CI: ready, then a device
	// refused). What must hold: a revoked device is refused at every
	// attempt, from the first; every other device is accepted within the
	// bound; and a round where a revoked device is refused between two
	// accepted ones shows the refusal is the revocation, not staleness.
	connect := func(i int) error { _, err := n3.MQTT(t, fmt.Sprintf("part-%d", i), certs[i]); return err }
	testenv.Eventually(t, 30*time.Second, func() error {
		var errs []error
		for i := range n {
			err := connect(i)
			if revoked := i%2 == 1; revoked && err == nil {
				t.Fatalf("node 3 after the heal accepted revoked part-%d", i)
			} else if !revoked && err != nil {
				errs = append(errs, fmt.Errorf("part-%d: %w", i, err))
			}
		}
		if len(errs) > 0 {
			return errors.Join(errs...)
		}
		before := connect(0)
		if connect(1) == nil {
			t.Fatal("node 3 after the heal accepted revoked part-1")
		}
		if after := connect(2); before != nil || after != nil {
			return fmt.Errorf("part-0 (%v) and part-2 (%v) not both accepted around the refusal of revoked part-1", before, after)
		}
		return nil
	})
}

// The second way to get NATS: fleetgate nodes on a NATS cluster the user
// runs (--nats-url), each on a different server of it.
func TestClusterExternalNATS(t *testing.T) {
	nats := natstest.Start(t, 3)
	src := testenv.Init(t)
	nodes := make([]*testenv.Gateway, 2)
	for i := range nodes {
		dir := filepath.Join(t.TempDir(), fmt.Sprint("ext", i))
		if err := testenv.CopyDataDir(dir, src); err != nil {
			t.Fatal(err)
		}
		cfg := testenv.Config(t, testenv.Options{DataDir: dir})
		cfg.Cluster = fgserver.ClusterConfig{NATSURL: nats.ClientURL(i), NodeName: fmt.Sprintf("ext%d", i), StaleAfter: time.Second,
			Security: fgserver.NATSSecurity{CA: nats.CAFile}}
		nodes[i] = testenv.StartConfig(t, cfg)
	}
	// Ready means the NATS cluster placed the directory bucket and the
	// broker's stream and buckets: on a freshly started cluster of a
	// loaded machine that took over 30 s once (as StartCluster, 60 s).
	for _, g := range nodes {
		testenv.Eventually(t, 60*time.Second, func() error {
			if code := g.Ready(); code != http.StatusOK {
				return fmt.Errorf("/readyz %d", code)
			}
			return nil
		})
	}
	if !strings.Contains(nodes[0].Logs.String(), "cannot check that JetStream syncs") {
		t.Error("no warning that an external NATS's sync setting is unchecked")
	}
	d := nodes[0].EnrollDevice(t, "ext-dev", "fleet")
	cert := deviceCert(t, d)
	lost := make(chan struct{}, 1)
	testenv.Eventually(t, 10*time.Second, func() error {
		_, err := nodes[1].MQTT(t, "ext-dev", cert, func(o *paho.ClientOptions) {
			o.SetConnectionLostHandler(func(paho.Client, error) { lost <- struct{}{} })
		})
		return err
	})
	if _, err := nodes[0].Admin.DeviceAction(context.Background(), "ext-dev", "revoke", "e2e"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("revocation through the first node did not close the session on the second")
	}
}

// A NATS server dies under a node (external NATS): its client reconnects
// to another server, the directory watch resumes from its last applied
// revision, and revocations through another node still close sessions on
// it (the time from the call is logged; a watch alone would be silent
// until nats.go's idle heartbeats noticed, about 10 s).
func TestClusterExternalNATSServerKilled(t *testing.T) {
	nats := natstest.Start(t, 3)
	src := testenv.Init(t)
	urls := []string{nats.ClientURL(0), nats.ClientURL(1) + "," + nats.ClientURL(2)}
	nodes := make([]*testenv.Gateway, 2)
	for i := range nodes {
		dir := filepath.Join(t.TempDir(), fmt.Sprint("ext", i))
		if err := testenv.CopyDataDir(dir, src); err != nil {
			t.Fatal(err)
		}
		cfg := testenv.Config(t, testenv.Options{DataDir: dir})
		cfg.Cluster = fgserver.ClusterConfig{NATSURL: urls[i], NodeName: fmt.Sprintf("ext%d", i), StaleAfter: time.Second,
			Security: fgserver.NATSSecurity{CA: nats.CAFile}}
		nodes[i] = testenv.StartConfig(t, cfg)
	}
	// Ready means the NATS cluster placed the directory bucket and the
	// broker's stream and buckets: on a freshly started cluster of a
	// loaded machine that took over 30 s once (as StartCluster, 60 s).
	for _, g := range nodes {
		testenv.Eventually(t, 60*time.Second, func() error {
			if code := g.Ready(); code != http.StatusOK {
				return fmt.Errorf("/readyz %d", code)
			}
			return nil
		})
	}
	const n = 3
	lost := make([]chan time.Time, n)
	for i := range n {
		id := fmt.Sprint("nk-", i)
		cert := deviceCert(t, nodes[0].EnrollDevice(t, id, "fleet"))
		lost[i] = make(chan time.Time, 1)
		testenv.Eventually(t, 10*time.Second, func() error {
			_, err := nodes[1].MQTT(t, id, cert, func(o *paho.ClientOptions) {
				o.SetConnectionLostHandler(func(paho.Client, error) { lost[i] <- time.Now() })
			})
			return err
		})
	}
	// Node 2's client is on NATS server 2 (URLs are tried in order).
	nats.Nodes[1].Shutdown()
	for i := range n {
		t0 := time.Now()
		testenv.Eventually(t, 20*time.Second, func() error {
			_, err := nodes[0].Admin.DeviceAction(context.Background(), fmt.Sprint("nk-", i), "revoke", "e2e")
			return err
		})
		select {
		case at := <-lost[i]:
			t.Logf("NATS server under node 2 killed; revocation %d through node 1 closed the session on node 2 %s after the call", i, at.Sub(t0).Round(time.Millisecond))
		case <-time.After(20 * time.Second):
			t.Fatalf("revocation %d did not close the session on node 2 after its NATS server died", i)
		}
	}
}

// A device enrolled through node 1 is revoked, suspended and resumed
// through node 2: the session on node 3 follows, and node 1's own records
// (which hold the device) follow too.
func TestClusterDeviceOfAnotherNodeManagedThroughAnyNode(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	ctx := context.Background()
	state := func(g *testenv.Gateway, id, want string) {
		t.Helper()
		testenv.Eventually(t, 10*time.Second, func() error {
			d, err := g.Admin.Device(ctx, id)
			if err != nil {
				return err
			}
			if d.State != want {
				return fmt.Errorf("%s is %s on the node that enrolled it, want %s", id, d.State, want)
			}
			return nil
		})
	}
	sus := deviceCert(t, n1.EnrollDevice(t, "other-sus", "fleet"))
	testenv.Eventually(t, 10*time.Second, func() error { _, err := n3.MQTT(t, "other-sus", sus); return err })
	if _, err := n2.Admin.DeviceAction(ctx, "other-sus", "suspend", "e2e"); err != nil {
		t.Fatal(err)
	}
	state(n1, "other-sus", "suspended")
	if _, err := n3.MQTT(t, "other-sus", sus); err == nil {
		t.Fatal("a device suspended through node 2 connected to node 3")
	}
	if _, err := n2.Admin.DeviceAction(ctx, "other-sus", "resume", "e2e"); err != nil {
		t.Fatal(err)
	}
	state(n1, "other-sus", "active")
	testenv.Eventually(t, 10*time.Second, func() error { _, err := n3.MQTT(t, "other-sus", sus); return err })

	rev := deviceCert(t, n1.EnrollDevice(t, "other-rev", "fleet"))
	lost := make(chan struct{}, 1)
	testenv.Eventually(t, 10*time.Second, func() error {
		_, err := n3.MQTT(t, "other-rev", rev, func(o *paho.ClientOptions) {
			o.SetConnectionLostHandler(func(paho.Client, error) { lost <- struct{}{} })
		})
		return err
	})
	res, err := n2.Admin.DeviceAction(ctx, "other-rev", "revoke", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.RevokedSerials) != 1 {
		t.Errorf("revoked serials %v, want the device's one certificate", res.RevokedSerials)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("revocation through node 2 of a device of node 1 did not close its session on node 3")
	}
	state(n1, "other-rev", "revoked")
	for k, g := range c.Nodes {
		if _, err := g.MQTT(t, "other-rev", rev); err == nil {
			t.Fatalf("revoked device reconnected to node %d", k+1)
		}
	}
}
