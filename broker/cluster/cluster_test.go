package cluster_test

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"

	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// node is one fleetgate node of a test cluster.
type node = testenv.Gateway

// startCluster starts three in-process fleetgate nodes with embedded NATS
// (testenv.StartCluster: routes through relays the test can cut) and
// waits until every node is ready. Everything stops when the test ends.
func startCluster(t *testing.T) *testenv.Cluster {
	t.Helper()
	return testenv.StartCluster(t, 3, nil)
}

// startClusterWithAdminClient starts 3 nodes, node i with a NATS client
// listener (TLS, one admin user from a 0600 users file), and connects to
// it as that user: the tests that write into the buckets as a rogue or
// racing writer would.
func startClusterWithAdminClient(t *testing.T, i int) (*testenv.Cluster, *nats.Conn) {
	t.Helper()
	addr := natstest.FreeAddr(t, "127.0.0.1")
	users := filepath.Join(t.TempDir(), "nats-users")
	if err := os.WriteFile(users, []byte("forger:forger-password-0123456789:admin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var caFile string
	c := testenv.StartCluster(t, 3, func(j int, cfg *server.Config) {
		if j == i {
			cfg.Cluster.NATSClientAddr, cfg.Cluster.Security.ClientUsers = addr, users
			caFile = filepath.Join(cfg.DataDir, server.ClusterCADir, "ca.pem")
		}
	})
	nc, err := nats.Connect("tls://forger:forger-password-0123456789@"+addr, nats.RootCAs(caFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return c, nc
}

// connectDevice connects d to nd (MQTT 3.1.1 through paho), retrying
// while nd's directory has not yet learnt the device.
func connectDevice(t *testing.T, nd *node, d *devicesdk.Device, opts ...func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	tcfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	return connect(t, nd, d.ID(), func(o *paho.ClientOptions) {
		o.SetTLSConfig(tcfg)
		for _, fn := range opts {
			fn(o)
		}
	})
}

func connect(t *testing.T, nd *node, id string, opts ...func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	var c paho.Client
	testenv.Eventually(t, 20*time.Second, func() error {
		var err error
		c, err = nd.MQTT(t, id, nil, opts...)
		return err
	})
	return c
}

func connectService(t *testing.T, nd *node, name string, cert tls.Certificate, opts ...func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	var c paho.Client
	testenv.Eventually(t, 20*time.Second, func() error {
		var err error
		// paho calls handlers in order only with OrderMatters.
		c, err = nd.MQTT(t, name, &cert, append([]func(*paho.ClientOptions){func(o *paho.ClientOptions) { o.SetOrderMatters(true) }}, opts...)...)
		return err
	})
	return c
}

// collector records the payloads a subscriber received, by topic.
type collector struct {
	mu   sync.Mutex
	got  map[string][]string
	seen map[string]bool
}

func newCollector() *collector {
	return &collector{got: map[string][]string{}, seen: map[string]bool{}}
}

func (c *collector) handle(_ paho.Client, m paho.Message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got[m.Topic()] = append(c.got[m.Topic()], string(m.Payload()))
	c.seen[m.Topic()+"\x00"+string(m.Payload())] = true
}

func (c *collector) has(topic, payload string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[topic+"\x00"+payload]
}

func (c *collector) topic(topic string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got[topic]...)
}

// warm publishes QoS 0 probes on topic from pub until sub's collector has
// one: the subscription's interest has reached the publisher's node.
func warm(t *testing.T, pub paho.Client, topic string, c *collector) {
	t.Helper()
	for i := 0; ; i++ {
		p := "warm-" + strconv.Itoa(i)
		pub.Publish(topic, 0, false, p).WaitTimeout(time.Second)
		deadline := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(deadline) {
			if c.has(topic, p) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		if i == 100 {
			t.Fatalf("no probe on %s reached the subscriber", topic)
		}
	}
}

// Issue 13, test 1: a device on node 1 publishes QoS 1; a service on node 3
// receives every message; with JetStream quorum lost, no PUBACK is sent.
func TestQoS1CrossNodeAndNoPubackWithoutQuorum(t *testing.T) {
	c := startCluster(t)
	nodes := c.Nodes
	dev := nodes[0].EnrollDevice(t, "dev-1", "lab")
	svcCert := nodes[0].Service(t, "svc-1")

	got := newCollector()
	svc := connectService(t, nodes[2], "svc-1", svcCert)
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, got.handle); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	pub := connectDevice(t, nodes[0], dev)
	warm(t, pub, "devices/dev-1/telemetry/warm", got)

	const n = 200
	topic := "devices/dev-1/telemetry/t"
	start := time.Now()
	for i := range n {
		tok := pub.Publish(topic, 1, false, strconv.Itoa(i))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("message %d: no PUBACK (%v)", i, tok.Error())
		}
	}
	acked := time.Since(start)
	testenv.Eventually(t, 10*time.Second, func() error {
		for i := range n {
			if !got.has(topic, strconv.Itoa(i)) {
				return fmt.Errorf("message %d of %d not received on node 3", i, n)
			}
		}
		return nil
	})
	t.Logf("%d QoS 1 messages, one at a time, node 1 → JetStream R3 → node 3: PUBACK after %v each on average; all received %v after the first publish",
		n, acked/n, time.Since(start))
	// Order per topic: the first copy of each message in publication order.
	first := map[string]int{}
	for k, p := range got.topic(topic) {
		if _, ok := first[p]; !ok {
			first[p] = k
		}
	}
	for i := 1; i < n; i++ {
		if first[strconv.Itoa(i)] < first[strconv.Itoa(i-1)] {
			t.Fatalf("message %d received before message %d", i, i-1)
		}
	}

	// Quorum lost: node 1 is cut off from nodes 2 and 3; alone it cannot
	// have JetStream store a message on a majority, so the device gets no
	// PUBACK.
	c.Mesh.Cut(0)
	tok := pub.Publish(topic, 1, false, "after-quorum-lost")
	if tok.WaitTimeout(4 * time.Second) {
		t.Fatalf("PUBACK without JetStream quorum (err %v)", tok.Error())
	}
}
