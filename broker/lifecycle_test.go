package broker_test

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"crypto/x509"
	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func certOf(t *testing.T, d *devicesdk.Device) tls.Certificate {
	t.Helper()
	cfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := cfg.GetClientCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

func TestRevokeCutsAHighRatePublisherAtOnce(t *testing.T) {
	// Limits high enough that the revocation, not the rate limit, cuts it.
	g := testenv.Start(t, testenv.Options{Limits: broker.Limits{MsgRate: 1e6, MsgBurst: 1e6, ByteRate: 1e9, ByteBurst: 1e9}})
	ctx := context.Background()
	dev := g.EnrollDevice(t, "hot-1", "lab")
	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	var maxSeen atomic.Uint64
	var received atomic.Int64
	tok := svc.Subscribe("devices/hot-1/telemetry/#", 0, func(_ paho.Client, m paho.Message) {
		if len(m.Payload()) == 8 {
			seq := binary.BigEndian.Uint64(m.Payload())
			for {
				old := maxSeen.Load()
				if seq <= old || maxSeen.CompareAndSwap(old, seq) {
					break
				}
			}
			received.Add(1)
		}
	})
	tok.Wait()

	c, err := dev.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var seq atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // publish as fast as the connection allows, at QoS 0
		defer wg.Done()
		buf := make([]byte, 8)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := seq.Add(1)
			binary.BigEndian.PutUint64(buf, n)
			if c.Publish(ctx, "devices/hot-1/telemetry/t", 0, false, buf) != nil {
				return
			}
		}
	}()
	testenv.Eventually(t, 10*time.Second, func() error {
		if received.Load() < 200 {
			return fmt.Errorf("only %d messages so far", received.Load())
		}
		return nil
	})

	resp, err := g.Admin.DeviceAction(ctx, "hot-1", "revoke", "stolen")
	// Any message numbered above this was published after revoke returned.
	sentBeforeReturn := seq.Load()
	if err != nil {
		t.Fatal(err)
	}
	if resp.State != "revoked" || len(resp.RevokedSerials) != 1 || !resp.SessionsClosed {
		t.Fatalf("revoke response %+v", resp)
	}
	testenv.Eventually(t, 5*time.Second, func() error {
		if c.IsConnected() {
			return errors.New("device still connected")
		}
		return nil
	})
	close(stop)
	wg.Wait()
	// Anything in flight lands within this marker round trip.
	pt := svc.Publish("devices/hot-1/commands/marker", 0, false, "x")
	pt.Wait()
	if got := maxSeen.Load(); got > sentBeforeReturn {
		t.Fatalf("message %d, published after revoke returned (last before: %d), was delivered", got, sentBeforeReturn)
	}
	t.Logf("%d messages delivered before revocation; highest %d, %d sent before revoke returned", received.Load(), maxSeen.Load(), sentBeforeReturn)

	// It cannot reconnect...
	if _, err := dev.Connect(ctx, brokerOpts(g)); err == nil {
		t.Fatal("revoked device reconnected")
	}
	// ...nor renew...
	var ae *api.Error
	if err := dev.Renew(ctx); !errors.As(err, &ae) || ae.Code != "client_cert_revoked" {
		t.Fatalf("renew of revoked device: %v", err)
	}
	// ...nor get a token to re-enroll.
	if _, err := g.Admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: "hot-1", Group: "lab"}); err == nil {
		t.Fatal("token minted for a revoked device")
	}
	if !strings.Contains(g.Metrics(t), `fleetgate_broker_sessions_closed_total{reason="revoked"}`) {
		t.Error("closed session not counted")
	}
}

func TestRevokeSendsMQTT5AdministrativeAction(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	dev := g.EnrollDevice(t, "v5-dev", "lab")
	m, err := dialMQTT5(t, g, "v5-dev", certOf(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.DeviceAction(context.Background(), "v5-dev", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	code, err := m.waitDisconnect(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0x98 {
		t.Fatalf("DISCONNECT reason 0x%02x, want 0x98 administrative action", code)
	}
}

func TestSuspendThenResume(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	dev := g.EnrollDevice(t, "nap-1", "lab")
	c, err := dev.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.DeviceAction(ctx, "nap-1", "suspend", "maintenance"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, func() error {
		if c.IsConnected() {
			return errors.New("still connected")
		}
		return nil
	})
	if _, err := dev.Connect(ctx, brokerOpts(g)); err == nil {
		t.Fatal("suspended device connected")
	}
	var ae *api.Error
	if err := dev.Renew(ctx); !errors.As(err, &ae) || ae.Code != "device_suspended" {
		t.Fatalf("renew while suspended: %v", err)
	}
	if _, err := g.Admin.DeviceAction(ctx, "nap-1", "resume", "done"); err != nil {
		t.Fatal(err)
	}
	c2, err := dev.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatalf("resumed device cannot connect: %v", err)
	}
	c2.Close()
	// Revoked is terminal: resume refuses.
	if _, err := g.Admin.DeviceAction(ctx, "nap-1", "revoke", "gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.DeviceAction(ctx, "nap-1", "resume", "try"); err == nil {
		t.Fatal("revoked device resumed")
	}
}

func fetchCRL(t *testing.T, g *testenv.Gateway) *x509.RevocationList {
	t.Helper()
	resp, err := http.Get("https://" + g.Addrs.API + api.PathCRL)
	if err == nil {
		resp.Body.Close()
		t.Fatal("CRL fetched without trusting the CA?")
	}
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots()}}}
	resp, err = cl.Get(g.URL() + api.PathCRL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	der, _ := io.ReadAll(resp.Body)
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(g.CA.Issuing); err != nil {
		t.Fatalf("CRL not signed by the issuing CA: %v", err)
	}
	return crl
}

func TestRevocationSurvivesRestartAndIsOnTheCRL(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	dev := g.EnrollDevice(t, "gone-1", "lab")
	keep := g.EnrollDevice(t, "keep-1", "lab")
	serial := fmt.Sprintf("%x", dev.Leaf().SerialNumber)
	before := fetchCRL(t, g)
	if len(before.RevokedCertificateEntries) != 0 {
		t.Fatalf("fresh CRL has entries")
	}
	if _, err := g.Admin.DeviceAction(ctx, "gone-1", "revoke", "compromised"); err != nil {
		t.Fatal(err)
	}
	after := fetchCRL(t, g)
	if after.Number.Cmp(before.Number) <= 0 {
		t.Errorf("CRL number did not increase: %v -> %v", before.Number, after.Number)
	}
	if !after.NextUpdate.After(after.ThisUpdate) {
		t.Error("CRL has no nextUpdate in the future")
	}
	if len(after.RevokedCertificateEntries) != 1 || fmt.Sprintf("%x", after.RevokedCertificateEntries[0].SerialNumber) != serial {
		t.Fatalf("CRL entries %v, want serial %s", after.RevokedCertificateEntries, serial)
	}

	dir := g.DataDir
	g.Stop()
	g2 := testenv.Start(t, testenv.Options{DataDir: dir})
	if _, err := g2.MQTT(t, "gone-1", ptr(certOf(t, dev))); err == nil {
		t.Fatal("revoked device connected after restart")
	}
	if _, err := g2.MQTT(t, "keep-1", ptr(certOf(t, keep))); err != nil {
		t.Fatalf("unrevoked device refused after restart: %v", err)
	}
	crl := fetchCRL(t, g2)
	if len(crl.RevokedCertificateEntries) != 1 {
		t.Fatalf("CRL after restart has %d entries", len(crl.RevokedCertificateEntries))
	}
	// openssl, a reader we did not write, lists the serial.
	if _, err := exec.LookPath("openssl"); err == nil {
		cl := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g2.Roots()}}}
		resp, err := cl.Get(g2.URL() + api.PathCRL)
		if err != nil {
			t.Fatal(err)
		}
		der, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cmd := exec.Command("openssl", "crl", "-inform", "DER", "-text", "-noout")
		cmd.Stdin = strings.NewReader(string(der))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("openssl crl: %v\n%s", err, out)
		}
		if !strings.Contains(strings.ToLower(strings.ReplaceAll(string(out), ":", "")), serial) {
			t.Fatalf("openssl does not list %s:\n%s", serial, out)
		}
	}
}

func TestExpiredSessionIsSweptAndRenewalKeepsQoS1(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 4 * time.Second, SweepInterval: 50 * time.Millisecond})
	ctx := context.Background()

	// A device that does not renew is disconnected when its certificate
	// expires, though its connection was valid when it was made.
	lazy := g.EnrollDevice(t, "lazy-1", "lab")
	c, err := lazy.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 15*time.Second, func() error {
		if c.IsConnected() {
			return errors.New("still connected")
		}
		return nil
	})
	if !strings.Contains(g.Metrics(t), `fleetgate_broker_sessions_closed_total{reason="expired"}`) {
		t.Error("expiry sweep not counted")
	}

	// A device that renews moves its persistent session to the new
	// certificate; QoS 1 commands sent meanwhile are all delivered. Its
	// certificates live long enough that no expiry sweep can close it while
	// the commands are in flight on a loaded machine (with the 4 s of the
	// part above, the new certificate expired before the last commands
	// arrived when the machine was busy: a test artefact, not a loss).
	g = testenv.Start(t, testenv.Options{DeviceCertTTL: 2 * time.Minute, SweepInterval: 50 * time.Millisecond})
	dev := g.EnrollDevice(t, "busy-1", "lab")
	first := dev.Leaf()
	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string]bool{}
	handler := func(m devicesdk.Message) {
		mu.Lock()
		got[string(m.Payload)] = true
		mu.Unlock()
	}
	opts := brokerOpts(g)
	opts.CleanSession = false
	dc, err := dev.Connect(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := dc.SubscribeCommands(ctx, 1, handler); err != nil {
		t.Fatal(err)
	}
	const n = 60
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range n {
			svc.Publish("devices/busy-1/commands/c", 1, false, fmt.Sprint(i)).Wait()
			time.Sleep(20 * time.Millisecond) // pace the sender across the renewal
		}
	}()
	if err := dev.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if dev.Leaf().SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("renewal kept the old certificate")
	}
	dc.Close()
	dc2, err := dev.Connect(ctx, opts) // persistent session, new certificate
	if err != nil {
		t.Fatal(err)
	}
	defer dc2.Close()
	// Re-subscribing attaches the handler; the session kept the subscription.
	if err := dc2.SubscribeCommands(ctx, 1, handler); err != nil {
		t.Fatal(err)
	}
	<-sent
	testenv.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) < n {
			var miss []int
			for i := range n {
				if !got[fmt.Sprint(i)] {
					miss = append(miss, i)
				}
			}
			return fmt.Errorf("%d of %d commands received (missing %v)", len(got), n, miss)
		}
		return nil
	})
}
