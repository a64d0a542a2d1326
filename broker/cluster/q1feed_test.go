package cluster_test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// startPatientCluster is startCluster with a long second staleness bound
// (a node cut off for a while keeps its sessions open) and dead-node bound
// (nobody sweeps the cut node's sessions meanwhile).
func startPatientCluster(t *testing.T) *testenv.Cluster {
	t.Helper()
	return testenv.StartCluster(t, 3, func(_ int, cfg *server.Config) { cfg.Cluster.StaleCloseAfter = 2 * time.Minute })
}

// publishAcked publishes until the broker acknowledges (a PUBACK may not
// come while JetStream elects a leader: the message is sent again, as a
// client would after its timeout; duplicates are allowed).
func publishAcked(t *testing.T, c paho.Client, topic, payload string) {
	t.Helper()
	for range 8 {
		tok := c.Publish(topic, 1, false, payload)
		if tok.WaitTimeout(8*time.Second) && tok.Error() == nil {
			return
		}
	}
	t.Fatalf("%s %s: no PUBACK", topic, payload)
}

// warmQoS1 publishes QoS 1 probes from pub until v receives one, then
// drains what v received so far.
func warmQoS1(t *testing.T, pub paho.Client, v *v5, topic string) {
	t.Helper()
	for i := 0; ; i++ {
		publishAcked(t, pub, topic, fmt.Sprintf("warm-%d", i))
		select {
		case <-v.msgs:
			for {
				select {
				case <-v.msgs:
				case <-time.After(300 * time.Millisecond):
					return
				}
			}
		case <-time.After(time.Second):
		}
		if i == 30 {
			t.Fatal("no QoS 1 probe reached the subscriber")
		}
	}
}

// liveSubscriber enrolls device dev-<x> and service svc-<x>, connects the
// device to node 1 subscribed to its commands (persistent session), the
// service to pubNode, and waits until QoS 1 flows from one to the other.
func liveSubscriber(t *testing.T, c *testenv.Cluster, pubNode *node, x string) (*v5, paho.Client) {
	t.Helper()
	n1 := c.Nodes[0]
	dev := n1.EnrollDevice(t, "dev-"+x, "lab")
	svcCert := n1.Service(t, "svc-"+x)
	sub := dial5(t, n1, "dev-"+x, deviceCert(t, dev))
	sub.subscribe(t, "devices/dev-"+x+"/commands/#")
	svc := connectService(t, pubNode, "svc-"+x, svcCert)
	warmQoS1(t, svc, sub, "devices/dev-"+x+"/commands/warm")
	return sub, svc
}

// publishCommands publishes n acknowledged QoS 1 commands alternately on
// <prefix>a and <prefix>b, payloads "a-0", "b-0", "a-1", ...
func publishCommands(t *testing.T, pub paho.Client, prefix string, n int) {
	t.Helper()
	for i := range n {
		l := "ab"[i%2]
		publishAcked(t, pub, prefix+string(l), fmt.Sprintf("%c-%d", l, i/2))
	}
}

// expectCommands waits until v has received each of the n commands
// publishCommands sent (duplicates allowed), and checks the order per
// topic of their first copies.
func expectCommands(t *testing.T, msgs <-chan *paho5.Publish, prefix string, n int, within time.Duration) {
	t.Helper()
	got := map[string]bool{}
	var order []string // first copies, in arrival order
	deadline := time.After(within)
	for len(got) < n {
		select {
		case m := <-msgs:
			if !strings.HasPrefix(m.Topic, prefix) || strings.HasPrefix(string(m.Payload), "warm-") {
				continue
			}
			k := m.Topic + " " + string(m.Payload)
			if !got[k] {
				got[k] = true
				order = append(order, k)
			}
		case <-deadline:
			var missing []string
			for i := range n {
				l := "ab"[i%2]
				if k := fmt.Sprintf("%s%c %c-%d", prefix, l, l, i/2); !got[k] {
					missing = append(missing, k)
				}
			}
			t.Fatalf("%d of %d acknowledged QoS 1 messages received; missing %v", len(got), n, missing)
		}
	}
	next := map[string]int{}
	for _, k := range order {
		topic, p, _ := strings.Cut(k, " ")
		var seq int
		fmt.Sscanf(p[2:], "%d", &seq)
		if seq != next[topic] {
			t.Fatalf("%s: got %s, want sequence %d (order %v)", topic, p, next[topic], order)
		}
		next[topic]++
	}
}

// A live persistent subscriber on node 1 whose node is cut off from the
// others while node 2 publishes QoS 1 on two topics (PUBACKs from the
// majority): after the heal it has every acknowledged message, in order
// per topic. Live routing by core NATS lost them all (at most once); the
// node's ordered consumer of fg_Q1 resumes where it was.
func TestLiveSubscriberGetsQoS1PublishedWhileItsNodeWasCut(t *testing.T) {
	c := startPatientCluster(t)
	sub, svc := liveSubscriber(t, c, c.Nodes[1], "l")

	c.Mesh.Cut(0)
	const n = 40
	publishCommands(t, svc, "devices/dev-l/commands/", n)
	c.Mesh.Heal(0)
	expectCommands(t, sub.msgs, "devices/dev-l/commands/", n, 90*time.Second)
	select {
	case d := <-sub.disc:
		t.Fatalf("the subscriber was disconnected (0x%02X): the test needs it online throughout", d.ReasonCode)
	default:
	}
	// The feed's metrics say the same: node 2 routed them into the
	// stream, node 1's feed applied them and handed them to its broker.
	if v := metricValue(t, c.Nodes[1], "fleetgate_cluster_routed_total"); v < n {
		t.Errorf("node 2 fleetgate_cluster_routed_total = %v, want at least %d", v, n)
	}
	if v := metricValue(t, c.Nodes[0], "fleetgate_cluster_received_total"); v < n {
		t.Errorf("node 1 fleetgate_cluster_received_total = %v, want at least %d", v, n)
	}
	if v := metricValue(t, c.Nodes[0], "fleetgate_cluster_q1_feed_applied_sequence"); v < n {
		t.Errorf("node 1 fleetgate_cluster_q1_feed_applied_sequence = %v, want at least %d", v, n)
	}
}

// metricValue is the value of an unlabelled metric on nd's /metrics.
func metricValue(t *testing.T, nd *node, name string) float64 {
	t.Helper()
	for _, l := range strings.Split(nd.Metrics(t), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return f
		}
	}
	t.Fatalf("no %s on /metrics", name)
	return 0
}

// The publisher's node is stopped right after its PUBACKs, its live copies
// to node 1 never sent (node 1 is cut off while node 3 publishes, as if they
// were in node 3's route buffer when it died): the online subscriber on
// node 1 still gets every acknowledged message, from the stream.
func TestLiveSubscriberGetsQoS1OfADeadPublisherNode(t *testing.T) {
	c := startPatientCluster(t)
	n3 := c.Nodes[2]
	sub, svc := liveSubscriber(t, c, n3, "k")

	c.Mesh.Cut(0)
	const n = 30
	publishCommands(t, svc, "devices/dev-k/commands/", n)
	svc.Disconnect(0)
	n3.Stop()
	c.Mesh.Heal(0)
	expectCommands(t, sub.msgs, "devices/dev-k/commands/", n, 90*time.Second)
}
