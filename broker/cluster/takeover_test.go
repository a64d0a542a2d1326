package cluster_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/broker/cluster"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// A session taken over whose replay from the stream cannot be done (the
// node loses its quorum between its claim of the record and the replay, as
// while JetStream elects new leaders after a node died) is not resumed
// without it: the CONNECT is refused with 0x88 once the bounded retries
// are spent, and the record keeps its replay point, so the client's next
// attempt, once the node is back, gets every queued message. The old code
// logged "offline messages not replayed" and accepted the CONNECT without
// them.
func TestSessionWhoseReplayFailsIsRefusedAndReplayedNextTime(t *testing.T) {
	c := startPatientCluster(t)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-r", "lab")
	cert := deviceCert(t, dev)
	svcCert := n1.Service(t, "svc-r")

	offlineSession(t, n1, "dev-r", cert, "devices/dev-r/commands/#")
	svc := connectService(t, n2, "svc-r", svcCert)
	const n = 20
	publishCommands(t, svc, "devices/dev-r/commands/", n)

	var once sync.Once
	cut := func(node string) {
		if node == "node2" {
			once.Do(func() { c.Mesh.Cut(2) })
		}
	}
	cluster.BeforeReplay.Store(&cut)
	t.Cleanup(func() { cluster.BeforeReplay.Store(nil) })
	var refused *v5
	testenv.Eventually(t, 30*time.Second, func() error {
		v, err := dial5Once(n3, "dev-r", cert, 90*time.Second)
		if v == nil || v.ack == nil {
			return fmt.Errorf("no CONNACK: %v", err) // node 3 does not know the device yet
		}
		refused = v
		return nil
	})
	if refused.ack.ReasonCode != 0x88 {
		t.Fatalf("CONNECT whose replay could not be done answered 0x%02X, want 0x88 (server unavailable)", refused.ack.ReasonCode)
	}
	cluster.BeforeReplay.Store(nil)
	c.Mesh.Heal(2)
	testenv.Eventually(t, 90*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusOK {
			return fmt.Errorf("node 3: /readyz %d", code)
		}
		return nil
	})
	second := dial5(t, n3, "dev-r", cert)
	if !second.ack.SessionPresent {
		t.Fatal("node 3: no session present on the attempt after the refusal")
	}
	expectCommands(t, second.msgs, "devices/dev-r/commands/", n, 60*time.Second)
}

// A write of a session record that JetStream refuses (a dead-node sweep's
// compare-and-swap on a record it read before the client came back here)
// reaches the core subscribers of the bucket's subjects anyway. The node
// that owns the session must not take it for a takeover: the old code
// closed the live session (0x8E) and forgot its subscriptions, so the
// device, back on another node, missed the commands published after.
func TestRefusedSessionWriteDoesNotEvictTheOwner(t *testing.T) {
	c, nc := startClusterWithAdminClient(t, 0)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-s", "lab")
	svcCert := n1.Service(t, "svc-s")
	sess := dial5(t, n2, "dev-s", deviceCert(t, dev))
	sess.subscribe(t, "devices/dev-s/commands/#")

	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, cluster.SessionsBucket)
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, "s.dev-s")
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		t.Fatal(err)
	}
	rec["node"], rec["conn"], rec["online"] = "node0", "read-before-the-takeover", false
	b, _ := json.Marshal(rec)
	var apiErr *jetstream.APIError
	if _, err := kv.Update(ctx, "s.dev-s", b, e.Revision()-1); err == nil {
		t.Fatal("JetStream accepted a compare-and-swap on a stale revision")
	} else if !errors.As(err, &apiErr) {
		t.Logf("refused: %v", err)
	}
	select {
	case d := <-sess.disc:
		t.Fatalf("a refused write of the record closed the owner's session (0x%02X)", d.ReasonCode)
	case <-time.After(3 * time.Second):
	}
	svc := connectService(t, n3, "svc-s", svcCert)
	publishAcked(t, svc, "devices/dev-s/commands/x", "after")
	select {
	case m := <-sess.msgs:
		if string(m.Payload) != "after" {
			t.Fatalf("got %q", m.Payload)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the session lost its subscription: no command received")
	}
}
