package cluster_test

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// A persistent session's SUBSCRIBE on a node cut off from the quorum: the
// session record cannot hold the new subscription, and a session resumed
// on another node gets its subscriptions from the record. Granted anyway
// (the old code), the subscription was lost with the node while the
// client, told "session present" elsewhere, never subscribed again. Now
// the SUBACK refuses it (0x80); after the heal the same SUBSCRIBE is
// granted, and the session keeps both subscriptions on another node.
func TestSubscriptionTheRecordCannotHoldIsRefused(t *testing.T) {
	c := startPatientCluster(t)
	n1, n3 := c.Nodes[0], c.Nodes[2]
	cert := deviceCert(t, n1.EnrollDevice(t, "dev-sub", "lab"))
	svc := connectService(t, n1, "svc-sub", n1.Service(t, "svc-sub"))

	v := dial5(t, n3, "dev-sub", cert)
	v.subscribe(t, "devices/dev-sub/commands/a")
	subscribeB := func(wait time.Duration) (*paho5.Suback, error) {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		return v.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: "devices/dev-sub/commands/b", QoS: 1}}})
	}

	c.Mesh.Cut(2)
	sa, err := subscribeB(60 * time.Second)
	if sa == nil || len(sa.Reasons) != 1 || sa.Reasons[0] != 0x80 {
		t.Fatalf("SUBSCRIBE on a node cut off from the quorum: %+v (%v), want reason 0x80", sa, err)
	}

	c.Mesh.Heal(2)
	testenv.Eventually(t, 90*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusOK {
			return fmt.Errorf("node 3: /readyz %d", code)
		}
		return nil
	})
	// Ready is not yet writable everywhere (JetStream may still elect):
	// the SUBSCRIBE is tried again, a few seconds apart (the broker's
	// subscribe rate disconnects a client that retries in a loop).
	for attempt := 0; ; attempt++ {
		sa, err := subscribeB(30 * time.Second)
		if err == nil && sa.Reasons[0] <= 2 {
			break
		}
		if attempt == 15 {
			t.Fatalf("SUBSCRIBE after the heal: %+v (%v)", sa, err)
		}
		time.Sleep(3 * time.Second)
	}
	if err := v.Disconnect(&paho5.Disconnect{ReasonCode: 0}); err != nil {
		t.Fatal(err)
	}

	// The session, resumed on node 1, has both subscriptions.
	back := dial5(t, n1, "dev-sub", cert)
	if !back.ack.SessionPresent {
		t.Fatal("node 1: no session present")
	}
	publishAcked(t, svc, "devices/dev-sub/commands/a", "a-0")
	publishAcked(t, svc, "devices/dev-sub/commands/b", "b-0")
	got := map[string]bool{}
	deadline := time.After(20 * time.Second)
	for len(got) < 2 {
		select {
		case m := <-back.msgs:
			got[m.Topic] = true
		case <-deadline:
			t.Fatalf("on node 1 after the move: %v, want commands on a and b", got)
		}
	}
}
