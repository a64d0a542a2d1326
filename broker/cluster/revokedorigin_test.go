package cluster_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	bcluster "github.com/fleetgate/fleetgate/broker/cluster"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// A node that has not yet learnt of a revocation (within its staleness
// bound, or cut off from the directory's updates) may accept messages the
// device sends after the revoke and store them in the cluster's stream
// (the chaos scenario, 2026-12-08: 4 messages of a revoked device reached
// the backend once replays read the stream). The nodes that deliver them
// know the revocation and drop them, live (the node's feed) and replayed
// (a session resumed on another node). The messages are written into the
// stream here as such a node would have routed them.
func TestRoutedMessagesOfARevokedDeviceAreNotDelivered(t *testing.T) {
	c, nc := startClusterWithAdminClient(t, 2)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	revoked := deviceCert(t, n1.EnrollDevice(t, "dev-rv", "lab"))
	n1.EnrollDevice(t, "dev-ok", "lab")
	svcCert := n1.Service(t, "svc-rv")
	col := newCollector()
	persistent := func(o *paho.ClientOptions) { o.SetCleanSession(false).SetDefaultPublishHandler(col.handle) }
	svc := connectService(t, n3, "svc-rv", svcCert, persistent)
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	testenv.Eventually(t, 30*time.Second, func() error {
		_, err := n1.Admin.DeviceAction(ctx, "dev-rv", "revoke", "test")
		return err
	})
	for _, nd := range c.Nodes { // every node knows
		testenv.Eventually(t, 30*time.Second, func() error {
			if v, err := dial5Once(nd, "dev-rv", revoked, 5*time.Second); err == nil && v.ack != nil && v.ack.ReasonCode == 0 {
				return fmt.Errorf("node %s still accepts the revoked device", nd.Addrs.MQTT)
			}
			return nil
		})
	}

	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	route := func(origin, payload string) {
		t.Helper()
		m := nats.NewMsg(bcluster.SubjectPrefix + ".1." + bcluster.EncodeTopic("devices/"+origin+"/telemetry/x"))
		m.Data = []byte(payload)
		m.Header.Set("Fg-Node", "node9")
		m.Header.Set("Fg-Id", nuid.Next())
		m.Header.Set("Fg-Origin", origin)
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	// The stream is read in order: once the active device's message is
	// delivered, the revoked one's before it was dropped, not late.
	expect := func(fence, leak, where string) {
		t.Helper()
		testenv.Eventually(t, 30*time.Second, func() error {
			if !col.has("devices/dev-ok/telemetry/x", fence) {
				return fmt.Errorf("%s: the active device's %s not delivered", where, fence)
			}
			return nil
		})
		if col.has("devices/dev-rv/telemetry/x", leak) {
			t.Fatalf("%s: a revoked device's message routed by a node that did not know was delivered", where)
		}
	}

	route("dev-rv", "leak-live")
	route("dev-ok", "fence-live")
	expect("fence-live", "leak-live", "live on node 3")

	svc.Disconnect(250)
	route("dev-rv", "leak-replayed")
	route("dev-ok", "fence-replayed")
	connectService(t, n2, "svc-rv", svcCert, persistent)
	expect("fence-replayed", "leak-replayed", "replayed on node 2")
}
