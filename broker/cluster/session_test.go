package cluster_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// v5 is an MQTT 5 client (paho.golang) of a test.
type v5 struct {
	*paho5.Client
	ack  *paho5.Connack
	disc chan *paho5.Disconnect
	msgs chan *paho5.Publish
}

func deviceCert(t *testing.T, d *devicesdk.Device) tls.Certificate {
	t.Helper()
	tc, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := tc.GetClientCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

// dial5 connects an MQTT 5 client with a persistent session (expiry 1 h,
// clean start false) to nd, retrying while nd does not know the
// certificate yet.
func dial5(t *testing.T, nd *node, id string, cert tls.Certificate) *v5 {
	t.Helper()
	var v *v5
	testenv.Eventually(t, 20*time.Second, func() (err error) {
		v, err = dial5Once(nd, id, cert, 10*time.Second)
		return err
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = v.Disconnect(&paho5.Disconnect{ReasonCode: 0})
		<-ctx.Done()
	})
	return v
}

// dial5Once is one attempt of dial5, waiting for the CONNACK up to wait;
// on a refusal it returns the CONNACK (v.ack) with the error.
func dial5Once(nd *node, id string, cert tls.Certificate, wait time.Duration) (*v5, error) {
	conn, err := tls.Dial("tcp", nd.Addrs.MQTT, &tls.Config{RootCAs: nd.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, err
	}
	c := &v5{disc: make(chan *paho5.Disconnect, 1), msgs: make(chan *paho5.Publish, 1024)}
	c.Client = paho5.NewClient(paho5.ClientConfig{Conn: conn,
		OnServerDisconnect: func(d *paho5.Disconnect) {
			select {
			case c.disc <- d:
			default:
			}
		},
		OnPublishReceived: []func(paho5.PublishReceived) (bool, error){func(p paho5.PublishReceived) (bool, error) {
			select {
			case c.msgs <- p.Packet:
			default:
			}
			return true, nil
		}},
		OnClientError: func(error) {}})
	expiry := uint32(3600)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c.ack, err = c.Connect(ctx, &paho5.Connect{ClientID: id, KeepAlive: 30, CleanStart: false,
		Properties: &paho5.ConnectProperties{SessionExpiryInterval: &expiry}})
	if err != nil {
		conn.Close()
		return c, err
	}
	return c, nil
}

func (v *v5) subscribe(t *testing.T, filter string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sa, err := v.Subscribe(ctx, &paho5.Subscribe{Subscriptions: []paho5.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if err != nil || len(sa.Reasons) != 1 || sa.Reasons[0] > 2 {
		t.Fatalf("subscribe %s: %v %+v", filter, err, sa)
	}
}

// Issue 13, test 3: the same client ID connects on node 1, then on node 2:
// one live session, session present on node 2 (with its subscription),
// node 1 closed its connection with 0x8E.
func TestSameClientIDOnTwoNodesIsTakenOver(t *testing.T) {
	c := startCluster(t)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-t", "lab")
	cert := deviceCert(t, dev)
	svcCert := n1.Service(t, "svc-t")

	first := dial5(t, n1, "dev-t", cert)
	if first.ack.SessionPresent {
		t.Fatal("session present on the first connection")
	}
	first.subscribe(t, "devices/dev-t/commands/#")

	second := dial5(t, n2, "dev-t", cert)
	if !second.ack.SessionPresent {
		t.Fatal("node 2: no session present for the session resumed from node 1")
	}
	select {
	case d := <-first.disc:
		if d.ReasonCode != 0x8E {
			t.Fatalf("node 1 closed the old connection with 0x%02X, want 0x8E", d.ReasonCode)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("node 1 did not close the taken-over connection")
	}
	select {
	case <-first.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the old connection is still open")
	}

	// The session is live on node 2 only: a command from a service on node
	// 3 reaches node 2's connection through the resumed subscription.
	svc := connectService(t, n3, "svc-t", svcCert)
	for i := 0; ; i++ {
		svc.Publish("devices/dev-t/commands/reboot", 1, false, fmt.Sprintf("cmd-%d", i)).WaitTimeout(5 * time.Second)
		select {
		case m := <-second.msgs:
			if !strings.HasPrefix(string(m.Payload), "cmd-") {
				t.Fatalf("unexpected %q", m.Payload)
			}
			return
		case <-time.After(300 * time.Millisecond):
		}
		if i == 50 {
			t.Fatal("no command reached the session on node 2")
		}
	}
}

// Issue 13, test 2: QoS 1 messages for an offline persistent device whose
// session was on node 1; it reconnects to node 2 and receives every one,
// in order per topic (duplicates allowed).
func TestOfflineSessionReplayedOnAnotherNode(t *testing.T) {
	c := startCluster(t)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-o", "lab")
	cert := deviceCert(t, dev)
	svcCert := n1.Service(t, "svc-o")

	offlineSession(t, n1, "dev-o", cert, "devices/dev-o/commands/#")
	svc := connectService(t, n3, "svc-o", svcCert)
	const n = 60
	publishCommands(t, svc, "devices/dev-o/commands/", n)

	second := dial5(t, n2, "dev-o", cert)
	if !second.ack.SessionPresent {
		t.Fatal("node 2: no session present")
	}
	expectCommands(t, second.msgs, "devices/dev-o/commands/", n, 20*time.Second)
	if !strings.Contains(n2.Logs.String(), "offline session replayed from the stream") {
		t.Fatal("node 2 did not replay the session from the stream")
	}
}

// offlineSession connects id to nd with a persistent session, subscribes
// it to the filters and disconnects it normally: the session stays,
// offline.
func offlineSession(t *testing.T, nd *node, id string, cert tls.Certificate, filters ...string) {
	t.Helper()
	first := dial5(t, nd, id, cert)
	for _, f := range filters {
		first.subscribe(t, f)
	}
	if err := first.Disconnect(&paho5.Disconnect{ReasonCode: 0}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-first.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("disconnect did not complete")
	}
}
