package cluster_test

import (
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
)

// A device that sends DISCONNECT and at once connects to another node is
// accepted every time: the new node's claim of the session record reads
// the revision the old node's DISCONNECT wrote (the buckets' reads go to
// the stream's leader, not to a lagging replica), and a lost
// compare-and-swap is retried after a short, jittered wait.
func TestReconnectRightAfterDisconnectOnAnotherNode(t *testing.T) {
	c := startCluster(t)
	dev := c.Nodes[0].EnrollDevice(t, "dev-r", "lab")
	cert := deviceCert(t, dev)
	// Every node knows the device (its directory learnt it); the session
	// has a subscription (one without is not resumed on another node).
	for _, nd := range c.Nodes {
		v := dial5(t, nd, "dev-r", cert)
		v.subscribe(t, "devices/dev-r/commands/#")
		if err := v.Disconnect(&paho5.Disconnect{ReasonCode: 0}); err != nil {
			t.Fatal(err)
		}
	}
	const rounds = 30
	accepted, present := 0, 0
	var absent []int
	for i := range rounds {
		nd := c.Nodes[i%len(c.Nodes)]
		v, err := dial5Once(nd, "dev-r", cert, 20*time.Second)
		if err != nil {
			t.Errorf("round %d: node %d refused the reconnect right after a DISCONNECT: %v (connack %+v)", i, i%len(c.Nodes), err, v)
			continue
		}
		accepted++
		if v.ack.SessionPresent {
			present++
		} else {
			absent = append(absent, i)
		}
		v.subscribe(t, "devices/dev-r/commands/#")
		if err := v.Disconnect(&paho5.Disconnect{ReasonCode: 0}); err != nil {
			t.Fatalf("round %d: disconnect: %v", i, err)
		}
	}
	if accepted != rounds {
		t.Fatalf("%d of %d reconnects accepted", accepted, rounds)
	}
	// Every reconnect resumed the persistent session another node left.
	if present != rounds {
		t.Fatalf("session present on %d of %d reconnects (absent in rounds %v)", present, rounds, absent)
	}
}
