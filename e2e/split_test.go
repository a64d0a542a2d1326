package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/adminclient"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func waitReady(t testing.TB, s *server) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, func() error {
		resp, err := http.Get("http://" + s.Addrs.Metrics + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("readyz %d", resp.StatusCode)
		}
		return nil
	})
}

// connectWatched connects d with a paho client that records when the
// connection is lost. The broker learns of new certificates through the
// feed, so the first attempts may be refused.
func connectWatched(t testing.TB, e *env, brokerAddr string, d *devicesdk.Device) (paho.Client, chan time.Time) {
	t.Helper()
	cfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan time.Time, 1)
	var c paho.Client
	testenv.Eventually(t, 10*time.Second, func() error {
		c = paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + brokerAddr).SetClientID(d.ID()).
			SetTLSConfig(cfg).SetAutoReconnect(false).SetConnectRetry(false).
			SetConnectionLostHandler(func(paho.Client, error) { lost <- time.Now() }))
		tok := c.Connect()
		if !tok.WaitTimeout(5 * time.Second) {
			return errors.New("connect timeout")
		}
		return tok.Error()
	})
	t.Cleanup(func() { c.Disconnect(50) })
	return c, lost
}

func TestSplitBrokerAndEnrollProcesses(t *testing.T) {
	e := initData(t)
	enr := serve(t, e.dataDir, "--only", "enroll")
	e.srv = enr
	enrollURL := "https://" + enr.Addrs.API
	brk := serve(t, e.dataDir, "--only", "broker", "--enroll-url", enrollURL)
	waitReady(t, brk)
	admin, err := adminclient.New(enrollURL, adminclient.FromDataDir(e.dataDir))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	// Revocation reaches the broker through the feed and cuts the session.
	d1, _ := e.enroll("split-1", "lab")
	_, lost := connectWatched(t, e, brk.Addrs.MQTT, d1)
	t0 := time.Now()
	if _, err := admin.DeviceAction(ctx, "split-1", "revoke", "split test"); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	select {
	case at := <-lost:
		t.Logf("split revoke: session closed %s after the call returned (%s after it started)", max(0, at.Sub(t1)), at.Sub(t0))
	case <-time.After(10 * time.Second):
		t.Fatal("session not closed after revocation in split mode")
	}

	// The broker was down during a revoke: on restart it refuses the device.
	d2, _ := e.enroll("split-2", "lab")
	connectWatched(t, e, brk.Addrs.MQTT, d2)
	stop(t, brk)
	if _, err := admin.DeviceAction(ctx, "split-2", "revoke", "while broker down"); err != nil {
		t.Fatal(err)
	}
	brk = serve(t, e.dataDir, "--only", "broker", "--enroll-url", enrollURL)
	waitReady(t, brk)
	cfg2, _ := d2.TLSConfig("localhost")
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + brk.Addrs.MQTT).SetClientID("split-2").SetTLSConfig(cfg2).SetAutoReconnect(false))
	if tok := c.Connect(); tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		t.Fatal("device revoked while the broker was down connected after its restart")
	}

	// The enrollment service restarts (new feed epoch): the broker catches
	// up by snapshot, and later revocations still reach it.
	d3, _ := e.enroll("split-3", "lab")
	_, lost3 := connectWatched(t, e, brk.Addrs.MQTT, d3)
	stop(t, enr)
	enr = serve(t, e.dataDir, "--only", "enroll", "--api-addr", enr.Addrs.API)
	e.srv = enr
	if _, err := admin.DeviceAction(ctx, "split-3", "revoke", "after enroll restart"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost3:
	case <-time.After(10 * time.Second):
		t.Fatal("revocation after an enrollment service restart did not reach the broker")
	}
}
