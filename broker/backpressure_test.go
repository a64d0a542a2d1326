package broker_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// gate holds a connection's reads while shut, so that its client stops
// taking what the broker sends: the broker's writes fill the socket buffers,
// then the client's outbound queue.
type gate struct{ mu sync.RWMutex }

func (g *gate) shut()                    { g.mu.Lock() }
func (g *gate) open()                    { g.mu.Unlock() }
func (g *gate) pass()                    { g.mu.RLock(); g.mu.RUnlock() } //nolint:staticcheck // a barrier
func (g *gate) wrap(c net.Conn) net.Conn { return &gatedConn{Conn: c, g: g} }

type gatedConn struct {
	net.Conn
	g *gate
}

func (c *gatedConn) Read(p []byte) (int, error) {
	c.g.pass()
	return c.Conn.Read(p)
}

func gated(g *gate) func(*paho.ClientOptions) {
	return func(o *paho.ClientOptions) {
		// paho reads PINGRESP on the gated connection too: with the default
		// keep-alive a long shut (a loaded machine) makes paho itself close
		// the connection, which is not what these tests are about
		o.SetKeepAlive(10 * time.Minute)
		o.SetCustomOpenConnectionFn(func(u *url.URL, opts paho.ClientOptions) (net.Conn, error) {
			c, err := tls.Dial("tcp", u.Host, opts.TLSConfig)
			if err != nil {
				return nil, err
			}
			return g.wrap(c), nil
		})
	}
}

// counter reads one unlabelled counter from the /metrics text.
func counter(t *testing.T, g *testenv.Gateway, name string) float64 {
	t.Helper()
	for _, line := range strings.Split(g.Metrics(t), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

const (
	fanDevices   = 4
	fanMessages  = 1500
	fanPayloadKB = 8 // 4 × 1,500 × 8 KiB = 48 MiB: far more than socket buffers and the queue hold
)

type fanIn struct {
	g        *testenv.Gateway
	devices  []*devicesdk.Client
	sent     atomic.Int64
	finished chan struct{}
}

func startFanIn(t *testing.T, q broker.Queues) *fanIn {
	g := testenv.Start(t, testenv.Options{DataDir: testenv.Init(t), Queues: q,
		Limits: broker.Limits{MsgRate: 1e9, MsgBurst: 1e9, ByteRate: 1e12, ByteBurst: 1e12}})
	f := &fanIn{g: g, finished: make(chan struct{})}
	for i := range fanDevices {
		d := g.EnrollDevice(t, fmt.Sprintf("bp-%d", i), "bench")
		c, err := d.Connect(context.Background(), brokerOpts(g))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		f.devices = append(f.devices, c)
	}
	return f
}

// publish sends every device's messages (QoS 0) and closes f.finished.
func (f *fanIn) publish(t *testing.T) {
	payload := make([]byte, fanPayloadKB<<10)
	var wg sync.WaitGroup
	for _, c := range f.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range fanMessages {
				if err := c.PublishTelemetry(context.Background(), "t", 0, payload); err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				f.sent.Add(1)
			}
		}()
	}
	go func() { wg.Wait(); close(f.finished) }()
}

func (f *fanIn) subscribe(t *testing.T, name string, opts ...func(*paho.ClientOptions)) *atomic.Int64 {
	cert := f.g.Service(t, name)
	c, err := f.g.MQTT(t, name, &cert, opts...)
	if err != nil {
		t.Fatal(err)
	}
	var got atomic.Int64
	if tok := c.Subscribe("devices/+/telemetry/#", 0, func(paho.Client, paho.Message) { got.Add(1) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	return &got
}

// quiet waits until the broker has taken no PUBLISH for a second (its
// publishers are held back) or the publishers are done; it reports which.
func (f *fanIn) quiet(t *testing.T) (heldBack bool) {
	last := -1.0
	for {
		select {
		case <-f.finished:
			return false
		case <-time.After(time.Second):
		}
		n := counter(t, f.g, "fleetgate_broker_messages_received_total")
		if n == last {
			return true
		}
		last = n
	}
}

func waitCount(t *testing.T, got *atomic.Int64, want int64) {
	t.Helper()
	testenv.Eventually(t, 60*time.Second, func() error {
		if n := got.Load(); n != want {
			return fmt.Errorf("received %d of %d", n, want)
		}
		return nil
	})
}

// A backend service that stops reading for a while: with fleetgate's
// service queue policy the devices' QoS 0 publishes wait (their read loops
// stop, TCP pushes back) and every message arrives once it reads again.
// The same load with upstream mochi's policy (drop when the queue is full)
// loses messages, which shows the load does overflow the queue.
func TestSlowServiceBackpressure(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 96 MiB through the broker")
	}
	t.Run("wait", func(t *testing.T) {
		f := startFanIn(t, broker.Queues{Service: mqtt.QueuePolicy{Size: 64, WaitQos0: 10 * time.Minute, WaitQos12: 10 * time.Minute}})
		var g gate
		got := f.subscribe(t, "slow-sink", gated(&g))
		g.shut()
		f.publish(t)
		heldBack := f.quiet(t)
		g.open()
		if !heldBack {
			t.Fatal("the publishers finished while the subscriber read nothing: no backpressure")
		}
		<-f.finished
		waitCount(t, got, fanDevices*fanMessages)
		if d := counter(t, f.g, "fleetgate_broker_messages_dropped_total"); d != 0 {
			t.Fatalf("%v messages dropped", d)
		}
	})
	t.Run("upstream-drop", func(t *testing.T) {
		f := startFanIn(t, broker.Queues{Service: mqtt.QueuePolicy{Size: 64}})
		var g gate
		got := f.subscribe(t, "slow-sink", gated(&g))
		g.shut()
		f.publish(t)
		<-f.finished // nothing holds the publishers back
		g.open()
		// Every message is either delivered or counted as dropped, and some
		// were dropped.
		testenv.Eventually(t, 60*time.Second, func() error {
			dropped := counter(t, f.g, "fleetgate_broker_messages_dropped_total")
			if n := got.Load() + int64(dropped); n != fanDevices*fanMessages {
				return fmt.Errorf("received %d + dropped %v of %d", got.Load(), dropped, fanDevices*fanMessages)
			}
			return nil
		})
		if got.Load() == fanDevices*fanMessages {
			t.Fatal("no message dropped: the load did not overflow the subscriber's queue")
		}
	})
}

// A service that never reads again does not hold the fleet back: after one
// wait of WaitQos0 its deliveries are dropped without waiting (counted),
// the devices finish publishing, and another service receives everything.
func TestStuckServiceDoesNotStallDevices(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 48 MiB through the broker")
	}
	f := startFanIn(t, broker.Queues{Service: mqtt.QueuePolicy{Size: 64, WaitQos0: 2 * time.Second, WaitQos12: 10 * time.Minute}})
	var g gate
	f.subscribe(t, "stuck-sink", gated(&g))
	probe := f.subscribe(t, "probe-sink")
	g.shut()
	defer g.open()
	f.publish(t)
	<-f.finished
	waitCount(t, probe, fanDevices*fanMessages)
	if d := counter(t, f.g, "fleetgate_broker_messages_dropped_total"); d == 0 {
		t.Fatal("nothing dropped for the stuck service")
	}
}

// More QoS 1 commands to a device than its outbound queue holds (32): none
// is dropped after the publisher's PUBACK; deliveries wait for room.
func TestCommandBurstToDeviceNotDropped(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DataDir: testenv.Init(t)})
	dev := g.EnrollDevice(t, "burst-1", "bench")
	c, err := dev.Connect(context.Background(), brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var got atomic.Int64
	if err := c.SubscribeCommands(context.Background(), 1, func(devicesdk.Message) { got.Add(1) }); err != nil {
		t.Fatal(err)
	}
	cert := g.Service(t, "commander")
	svc, err := g.MQTT(t, "commander", &cert)
	if err != nil {
		t.Fatal(err)
	}
	const n = 2000
	payload := make([]byte, 2048)
	toks := make([]paho.Token, 0, n)
	for i := range n {
		toks = append(toks, svc.Publish(fmt.Sprintf("devices/burst-1/commands/c%d", i), 1, false, payload))
	}
	for _, tok := range toks {
		if !tok.WaitTimeout(60*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	waitCount(t, &got, n)
}
