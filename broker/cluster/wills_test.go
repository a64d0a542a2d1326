package cluster_test

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// Issue 13 (item of the design, part of test 4): the owner of a session
// dies — here node 1 is cut off from the other two, so it is dead to them
// — and the session's Last Will is sent exactly once, by a surviving node,
// to subscribers on both surviving nodes.
func TestWillOfADeadNodeSentOnce(t *testing.T) {
	c := startCluster(t)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-w", "lab")
	cert2, cert3 := n1.Service(t, "svc-w2"), n1.Service(t, "svc-w3")
	const topic = "devices/dev-w/state"

	var got2, got3 atomic.Int32
	count := func(n *atomic.Int32) paho.MessageHandler {
		return func(_ paho.Client, m paho.Message) {
			if string(m.Payload()) == "gone" {
				n.Add(1)
			}
		}
	}
	s2 := connectService(t, n2, "svc-w2", cert2)
	s3 := connectService(t, n3, "svc-w3", cert3)
	for _, s := range []struct {
		c paho.Client
		n *atomic.Int32
	}{{s2, &got2}, {s3, &got3}} {
		if tok := s.c.Subscribe(topic, 1, count(s.n)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("subscribe: %v", tok.Error())
		}
	}
	connectDevice(t, n1, dev, func(o *paho.ClientOptions) { o.SetWill(topic, "gone", 1, false) })

	c.Mesh.Cut(0)
	deadline := time.Now().Add(30 * time.Second)
	for got2.Load() == 0 || got3.Load() == 0 {
		if time.Now().After(deadline) {
			for i, n := range c.Nodes {
				for _, l := range strings.Split(n.Logs.String(), "\n") {
					if strings.Contains(l, "will") || strings.Contains(l, "silent") {
						t.Logf("node %d: %s", i+1, l)
					}
				}
			}
			t.Fatalf("will received %d times on node 2, %d on node 3, want once each", got2.Load(), got3.Load())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // a second sender would show by now
	if a, b := got2.Load(), got3.Load(); a != 1 || b != 1 {
		t.Fatalf("will received %d times on node 2, %d on node 3, want once each", a, b)
	}
}
