package cluster_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"

	bcluster "github.com/fleetgate/fleetgate/broker/cluster"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// retainedOn subscribes c to topic and returns the retained payload it is
// sent within a short wait ("" when none), then unsubscribes.
func retainedOn(t *testing.T, c paho.Client, topic string) (string, bool) {
	t.Helper()
	ch := make(chan string, 4)
	tok := c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) {
		if m.Retained() {
			ch <- string(m.Payload())
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	// Not `defer c.Unsubscribe(topic).WaitTimeout(…)`: that evaluates
	// c.Unsubscribe(topic) at once, and a retained PUBLISH arriving after
	// paho dropped the route is discarded unacknowledged ("no handler").
	// It made this test fail about 1 run in 6 (the retained message was
	// sent, after the SUBACK, once the UNSUBSCRIBE had left).
	defer func() { c.Unsubscribe(topic).WaitTimeout(10 * time.Second) }()
	select {
	case p := <-ch:
		return p, true
	case <-time.After(500 * time.Millisecond):
		return "", false
	}
}

// Issue 13, test 9: a retained message set on node 1, then deleted: node 3
// sees both.
func TestRetainedSetAndDeleteAcrossNodes(t *testing.T) {
	c := startCluster(t)
	n1, n3 := c.Nodes[0], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-r", "lab")
	svcCert := n1.Service(t, "svc-r")
	pub := connectDevice(t, n1, dev)
	svc := connectService(t, n3, "svc-r", svcCert)
	const topic = "devices/dev-r/state"

	if tok := pub.Publish(topic, 1, true, "on"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("retained publish: no PUBACK (%v)", tok.Error())
	}
	defer func() {
		if t.Failed() {
			for i, n := range c.Nodes {
				for _, l := range strings.Split(n.Logs.String(), "\n") {
					if strings.Contains(l, "retain") || strings.Contains(l, "broker-cluster") {
						t.Logf("node %d: %s", i+1, l)
					}
				}
			}
		}
	}()
	testenv.Eventually(t, 10*time.Second, func() error {
		if p, ok := retainedOn(t, svc, topic); !ok || p != "on" {
			return fmt.Errorf("node 3 serves retained %q (%v), want \"on\"", p, ok)
		}
		return nil
	})

	if tok := pub.Publish(topic, 1, true, ""); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("retained delete: no PUBACK (%v)", tok.Error())
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if p, ok := retainedOn(t, svc, topic); ok {
			return fmt.Errorf("node 3 still serves retained %q after the delete", p)
		}
		return nil
	})
	// Node 2 has none either (the service moves there: its session on
	// node 3 is taken over).
	svc2 := connectService(t, c.Nodes[1], "svc-r", svcCert)
	if p, ok := retainedOn(t, svc2, topic); ok {
		t.Fatalf("node 2 serves retained %q after the delete", p)
	}
}

// A write into the retained bucket that JetStream refused (a lost
// compare-and-swap, or no quorum) is still delivered to core subscribers
// of the bucket's subjects. It must not become a node's retained message:
// only what the bucket committed is applied, in revision order (the old
// core-subscription path served it).
func TestUncommittedRetainedIsNotServed(t *testing.T) {
	c, nc := startClusterWithAdminClient(t, 2)
	n1, n3 := c.Nodes[0], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-u", "lab")
	svcCert := n1.Service(t, "svc-u")
	pub := connectDevice(t, n1, dev)
	svc := connectService(t, n3, "svc-u", svcCert)

	// The refused write: a put that expects a revision the key does not
	// have (as a compare-and-swap that lost does).
	const ghost = "devices/ghost/state"
	m := nats.NewMsg("$KV." + bcluster.RetainedBucket + ".r." + strings.ReplaceAll(bcluster.EncodeTopic(ghost), "~", "="))
	m.Data = []byte(`{"node":"node9","origin":"ghost","qos":1,"payload":"Z2hvc3Q="}`)
	m.Header.Set("Nats-Expected-Last-Subject-Sequence", "999999")
	if err := nc.PublishMsg(m); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// A committed retained message after it: once node 3 serves this one,
	// its watch is past the refused write.
	const real = "devices/dev-u/state"
	if tok := pub.Publish(real, 1, true, "real"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("retained publish: no PUBACK (%v)", tok.Error())
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if p, ok := retainedOn(t, svc, real); !ok || p != "real" {
			return fmt.Errorf("node 3 serves retained %q (%v), want \"real\"", p, ok)
		}
		return nil
	})
	if p, ok := retainedOn(t, svc, ghost); ok {
		t.Fatalf("node 3 serves retained %q that the bucket refused", p)
	}
}
