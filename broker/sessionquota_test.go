package broker_test

import (
	"fmt"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// labelled reads one labelled counter (0 when absent) from the /metrics text.
func labelled(t *testing.T, g *testenv.Gateway, name, labels string) float64 {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name+"{"+labels+"}") + ` (\S+)$`)
	m := re.FindStringSubmatch(g.Metrics(t))
	if m == nil {
		return 0
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// One backend's persistent session is offline, and far more QoS 1 messages
// arrive for it than its quota (and than the broker-wide 50,000 that used
// to stall every QoS 1 publisher). Its queue stops at the quota, the rest
// is counted; every publisher — on the offline session's topics and on
// others — keeps getting its PUBACKs, and online subscribers get
// everything.
//
// This one uses the default quota and floods past the old broker-wide mark
// (on the code before the fix it stalls at message 50,001); it is skipped
// with -short and under the race detector (too slow there on a shared
// machine). TestOfflineSessionQuotaConfigured runs the same scenario small.
func TestOfflineSessionQuotaDoesNotStallFleet(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("publishes 50,000 QoS 1 messages")
	}
	offlineQuotaScenario(t, broker.Queues{}, 50_200, broker.DefaultQueues.Service.MaxOffline)
}

// The same with a small configured quota, so it runs everywhere.
func TestOfflineSessionQuotaConfigured(t *testing.T) {
	svc := broker.DefaultQueues.Service
	svc.MaxOffline = 300
	offlineQuotaScenario(t, broker.Queues{Service: svc}, 1_000, 300)
}

func offlineQuotaScenario(t *testing.T, q broker.Queues, floodN, quota int) {
	g := testenv.Start(t, testenv.Options{DataDir: testenv.Init(t), Queues: q,
		Limits: broker.Limits{MsgRate: 1e9, MsgBurst: 1e9, ByteRate: 1e12, ByteBurst: 1e12}})

	// The backend subscribes with a persistent session, then goes away.
	sinkCert := g.Service(t, "sink")
	sink, err := g.MQTT(t, "sink", &sinkCert, func(o *paho.ClientOptions) { o.SetCleanSession(false) })
	if err != nil {
		t.Fatal(err)
	}
	if tok := sink.Subscribe("devices/+/telemetry/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	sink.Disconnect(100)
	testenv.Eventually(t, 10*time.Second, func() error {
		if n := labelled(t, g, "fleetgate_broker_connections", `role="service"`); n != 0 {
			return fmt.Errorf("%v service connections", n)
		}
		return nil
	})

	// An online backend sees the fleet's telemetry.
	liveCert := g.Service(t, "live")
	live, err := g.MQTT(t, "live", &liveCert)
	if err != nil {
		t.Fatal(err)
	}
	var liveGot atomic.Int64
	if tok := live.Subscribe("devices/probe-1/#", 1, func(paho.Client, paho.Message) { liveGot.Add(1) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	// A device floods the offline session's filter: past the session's
	// quota and past the old broker-wide mark.
	flood := g.EnrollDevice(t, "flood-1", "lab")
	fc, err := g.MQTT(t, "flood-1", ptr(certOf(t, flood)))
	if err != nil {
		t.Fatal(err)
	}
	toks := make([]paho.Token, 0, 1024)
	acked := 0
	deadline := time.Now().Add(3 * time.Minute)
	for i := 0; i < floodN; i++ {
		toks = append(toks, fc.Publish("devices/flood-1/telemetry/t", 1, false, []byte("x")))
		if len(toks) == cap(toks) || i == floodN-1 {
			for _, tok := range toks {
				if !tok.WaitTimeout(time.Until(deadline)) || tok.Error() != nil {
					t.Fatalf("flood stalled: %d of %d QoS 1 messages acknowledged (%v)", acked, floodN, tok.Error())
				}
				acked++
			}
			toks = toks[:0]
		}
	}

	// Other devices: QoS 1 on a topic the offline session subscribes to
	// (its quota is full) and on one it does not. Each PUBACK must come
	// well within one backpressure wait (30 s).
	probe := g.EnrollDevice(t, "probe-1", "lab")
	pc, err := g.MQTT(t, "probe-1", ptr(certOf(t, probe)))
	if err != nil {
		t.Fatal(err)
	}
	const probes = 20
	for i := range probes {
		for _, topic := range []string{"devices/probe-1/telemetry/t", "devices/probe-1/state"} {
			tok := pc.Publish(topic, 1, false, []byte(strconv.Itoa(i)))
			if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
				t.Fatalf("probe %d on %s: no PUBACK (%v)", i, topic, tok.Error())
			}
		}
	}
	waitCount(t, &liveGot, 2*probes)

	// Everything past the quota was counted, for the session's role.
	want := float64(floodN + probes - quota)
	testenv.Eventually(t, 10*time.Second, func() error {
		if n := labelled(t, g, "fleetgate_broker_session_quota_dropped_total", `role="service"`); n != want {
			return fmt.Errorf("session quota drops %v, want %v", n, want)
		}
		return nil
	})

	// The session kept what it held: exactly its quota, delivered when
	// the backend comes back.
	var back atomic.Int64
	if _, err := g.MQTT(t, "sink", &sinkCert, func(o *paho.ClientOptions) {
		o.SetCleanSession(false).SetDefaultPublishHandler(func(paho.Client, paho.Message) { back.Add(1) })
	}); err != nil {
		t.Fatal(err)
	}
	waitCount(t, &back, int64(quota))
}
