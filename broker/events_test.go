package broker_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func TestConnectAndDisconnectEventsReachServicesOnly(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	svcCert := g.Service(t, "watcher")
	// In order: paho otherwise runs each message's handler in a goroutine
	// of its own, and the two events could reach the channel swapped.
	svc, err := g.MQTT(t, "watcher", &svcCert, func(o *paho.ClientOptions) { o.SetOrderMatters(true) })
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan broker.Event, 8)
	topics := make(chan string, 8)
	tok := svc.Subscribe("$fleetgate/events/#", 1, func(_ paho.Client, m paho.Message) {
		var ev broker.Event
		if json.Unmarshal(m.Payload(), &ev) == nil {
			events <- ev
			topics <- m.Topic()
		}
	})
	tok.Wait()
	if tok.(*paho.SubscribeToken).Result()["$fleetgate/events/#"] >= 0x80 {
		t.Fatal("service may not subscribe to events")
	}
	d := g.EnrollDevice(t, "ev-1", "lab")
	c, err := d.Connect(context.Background(), brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	// Devices may not read events.
	if err := c.Subscribe(context.Background(), "$fleetgate/events/#", 0, nil); err == nil {
		t.Error("device subscribed to broker events")
	}
	c.Close()
	want := []string{"connected", "disconnected"}
	for _, w := range want {
		for {
			select {
			case ev := <-events:
				topic := <-topics
				// Events are published from their own queue: the watcher's own
				// connect event may arrive after its subscription.
				if ev.Identity == "service/watcher" && ev.Event == "connected" {
					continue
				}
				if ev.Event != w || ev.Identity != "device/ev-1" || !strings.HasSuffix(topic, "/device/ev-1/"+w) {
					t.Fatalf("event %+v on %s, want %s of device/ev-1", ev, topic, w)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("no %s event", w)
			}
			break
		}
	}
}
