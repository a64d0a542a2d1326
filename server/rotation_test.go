package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/operator/client"
)

// refusals sums fleetgate_broker_auth_failures_total over its reasons.
func refusals(t *testing.T, g *testenv.Gateway) int {
	t.Helper()
	n := 0
	re := regexp.MustCompile(`(?m)^fleetgate_broker_auth_failures_total\{[^}]*\} (\S+)$`)
	for _, m := range re.FindAllStringSubmatch(g.Metrics(t), -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		n += int(v)
	}
	return n
}

// fleetDevice is a device publishing QoS 1 telemetry through the broker,
// moving its MQTT session onto each renewed certificate.
type fleetDevice struct {
	d        *devicesdk.Device
	g        *testenv.Gateway
	mu       sync.Mutex
	c        paho.Client
	acked    []string
	connErrs atomic.Int32
}

func (f *fleetDevice) connect() error {
	tcfg, err := f.d.TLSConfig("localhost")
	if err != nil {
		return err
	}
	o := paho.NewClientOptions().AddBroker("tls://" + f.g.Addrs.MQTT).SetClientID(f.d.ID()).SetTLSConfig(tcfg).
		SetCleanSession(false).SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(10 * time.Second)
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		f.connErrs.Add(1)
		return errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		f.connErrs.Add(1)
		return err
	}
	f.mu.Lock()
	old := f.c
	f.c = c
	f.mu.Unlock()
	if old != nil {
		old.Disconnect(250)
	}
	return nil
}

// publish publishes one QoS 1 message and records it once acknowledged.
func (f *fleetDevice) publish(seq int) {
	f.mu.Lock()
	c := f.c
	f.mu.Unlock()
	if c == nil {
		return
	}
	payload := fmt.Sprintf("%s/%d", f.d.ID(), seq)
	tok := c.Publish("devices/"+f.d.ID()+"/telemetry/t", 1, false, payload)
	if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
		f.mu.Lock()
		f.acked = append(f.acked, payload)
		f.mu.Unlock()
	}
}

func (f *fleetDevice) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.c != nil {
		f.c.Disconnect(250)
	}
}

func status(t *testing.T, cl *client.Client) map[string]api.CAIssuer {
	t.Helper()
	st, err := cl.CAStatus(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]api.CAIssuer{}
	for _, i := range st.Issuers {
		out[i.ID] = i
	}
	return out
}

// TestRotationUnderRunningFleet: devices publish QoS 1 through rotate →
// renew (devicesdk's early renewal) → retire; a device offline during the
// overlap renews when it comes back; retire is refused while it depends on
// the old CA. No connection is refused but the one deliberate old-CA
// handshake after the retirement, and every acknowledged message arrives.
func TestRotationUnderRunningFleet(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 24 * time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	oldID := g.CA.Current().ID

	// The subscriber: a service reading all telemetry.
	got := map[string]bool{}
	var gotMu sync.Mutex
	onMsg := func(_ paho.Client, m paho.Message) {
		gotMu.Lock()
		got[string(m.Payload())] = true
		gotMu.Unlock()
	}
	persistent := func(o *paho.ClientOptions) { o.SetCleanSession(false).SetDefaultPublishHandler(onMsg) }
	svcCert := g.Service(t, "collector")
	sub, err := g.MQTT(t, "collector", &svcCert, persistent)
	if err != nil {
		t.Fatal(err)
	}
	if tok := sub.Subscribe("devices/+/telemetry/#", 1, onMsg); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}

	const n = 6
	var fleet []*fleetDevice
	for i := range n {
		f := &fleetDevice{d: g.EnrollDevice(t, fmt.Sprintf("rot-%d", i), "lab"), g: g}
		if err := f.connect(); err != nil {
			t.Fatal(err)
		}
		fleet = append(fleet, f)
	}
	sleeper := &fleetDevice{d: g.EnrollDevice(t, "rot-sleeper", "lab"), g: g}
	stcfg, err := sleeper.d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	sleeperOld, err := stcfg.GetClientCertificate(nil) // kept: renewal installs a new one
	if err != nil {
		t.Fatal(err)
	}
	before := refusals(t, g)
	if st := status(t, g.Admin); st[oldID].ActiveDevices != n+1 {
		t.Fatalf("before the rotation: %d active devices on %s, want %d", st[oldID].ActiveDevices, oldID, n+1)
	}

	// Publishers run through the whole rotation.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for _, f := range fleet {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; ; seq++ {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				f.publish(seq)
			}
		}()
	}

	rot, err := g.Admin.CARotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	newID := rot.Issuer.ID
	if !rot.ServerReissued || !rot.OperatorReissued || newID == oldID {
		t.Fatalf("rotation: %+v", rot)
	}
	// The broker's server certificate now comes from the new CA.
	conn, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost",
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &svcCert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	srvChain := conn.ConnectionState().PeerCertificates
	conn.Close()
	if ca.IssuerID(srvChain[1]) != newID {
		t.Fatalf("broker's server certificate issued by %s, want %s", ca.IssuerID(srvChain[1]), newID)
	}

	for _, f := range fleet {
		if !f.connected() {
			t.Fatalf("%s lost its session at the rotation", f.d.ID())
		}
	}

	// The service is re-issued by the new CA and moves its persistent
	// session onto it.
	svcCert = g.Service(t, "collector")
	sub.Disconnect(250)
	if sub, err = g.MQTT(t, "collector", &svcCert, persistent); err != nil {
		t.Fatal(err)
	}

	// Each device notices (devicesdk asks which CA is current), renews
	// early with jitter, and moves its session onto the new certificate.
	renewOpts := func(f *fleetDevice, renewed chan<- string) devicesdk.RenewOptions {
		return devicesdk.RenewOptions{IssuerCheck: 100 * time.Millisecond, EarlyJitter: time.Second,
			OnRenewed: func() {
				if err := f.connect(); err != nil {
					t.Errorf("%s reconnect on the new certificate: %v", f.d.ID(), err)
				}
				renewed <- f.d.ID()
			}, OnError: func(err error) { t.Errorf("%s renew: %v", f.d.ID(), err) }}
	}
	renewed := make(chan string, 2*n+2)
	rctx, rcancel := context.WithCancel(ctx)
	var rwg sync.WaitGroup
	for _, f := range fleet {
		rwg.Add(1)
		go func() { defer rwg.Done(); _ = f.d.AutoRenew(rctx, renewOpts(f, renewed)) }()
	}
	for range n {
		select {
		case <-renewed:
		case <-time.After(60 * time.Second):
			t.Fatal("the fleet did not renew onto the new CA")
		}
	}
	rcancel()
	rwg.Wait()

	// The sleeper still depends on the old CA: retirement is refused.
	st := status(t, g.Admin)
	if st[oldID].ActiveDevices != 1 || st[newID].ActiveDevices != n || st[oldID].State != "trusted" || st[newID].State != "current" {
		t.Fatalf("after the renewals: old %+v, new %+v", st[oldID], st[newID])
	}
	_, err = g.Admin.CARetire(ctx, oldID, false)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.ReasonCAInUse {
		t.Fatalf("retire while the sleeper depends on it: %v", err)
	}

	// The sleeper comes back during the overlap: it connects on its old
	// certificate, learns of the rotation, renews, moves over.
	if err := sleeper.connect(); err != nil {
		t.Fatalf("sleeper on the old CA during the overlap: %v", err)
	}
	sctx, scancel := context.WithCancel(ctx)
	sdone := make(chan struct{})
	go func() { defer close(sdone); _ = sleeper.d.AutoRenew(sctx, renewOpts(sleeper, renewed)) }()
	select {
	case <-renewed:
	case <-time.After(60 * time.Second):
		t.Fatal("the sleeper did not renew")
	}
	scancel()
	<-sdone
	sleeper.publish(0)

	// CRLs: one per trusted issuing CA, each signed by its CA.
	for _, id := range []string{oldID, newID} {
		der := httpsGet(t, g, api.PathCRLIssuer+id)
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		iss, _ := g.CA.Issuer(id)
		if id == newID {
			a, _ := ca.Load(g.DataDir, ca.Options{})
			iss, _ = a.Issuer(id)
		}
		if err := rl.CheckSignatureFrom(iss.Cert); err != nil {
			t.Fatalf("CRL of %s: %v", id, err)
		}
	}

	if st := status(t, g.Admin); st[oldID].ActiveDevices != 0 || st[oldID].Principals != 0 {
		t.Fatalf("still %d active devices and %d services or operators on the old CA", st[oldID].ActiveDevices, st[oldID].Principals)
	}
	ret, err := g.Admin.CARetire(ctx, oldID, false)
	if err != nil {
		t.Fatal(err)
	}
	if ret.SessionsClosed != 0 {
		t.Fatalf("retirement closed %d sessions; every device had moved", ret.SessionsClosed)
	}
	if got := refusals(t, g); got != before {
		t.Fatalf("%d connections refused during the rotation", got-before)
	}
	for _, f := range append(fleet, sleeper) {
		if n := f.connErrs.Load(); n > 0 {
			t.Fatalf("%s: %d failed connects", f.d.ID(), n)
		}
	}

	// The old operator certificate no longer opens the admin API; the
	// re-issued one in the data directory does.
	if _, err := g.Admin.CAStatus(ctx); err == nil {
		t.Fatal("the old CA's operator certificate still accepted after the retirement")
	}
	admin, err := client.New(g.URL(), client.FromDataDir(g.DataDir))
	if err != nil {
		t.Fatal(err)
	}
	if st := status(t, admin); st[oldID].State != "retired" || len(st) != 2 {
		t.Fatalf("after the retirement: %+v", st)
	}
	// The one deliberate refusal: the sleeper's old certificate.
	if c, err := g.MQTT(t, "rot-sleeper", sleeperOld); err == nil {
		c.Disconnect(0)
		t.Fatal("a retired CA's certificate was admitted")
	}

	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	acked := 0
	testenv.Eventually(t, 30*time.Second, func() error {
		gotMu.Lock()
		defer gotMu.Unlock()
		acked = 0
		for _, f := range append(fleet, sleeper) {
			f.mu.Lock()
			for _, p := range f.acked {
				acked++
				if !got[p] {
					f.mu.Unlock()
					return fmt.Errorf("acknowledged %s not delivered", p)
				}
			}
			f.mu.Unlock()
		}
		return nil
	})
	for _, f := range fleet {
		f.close()
	}
	sleeper.close()
	t.Logf("rotation run: %d QoS 1 messages acknowledged and delivered, %d devices renewed onto %s, 0 refused", acked, n+1, newID)
	if acked < n {
		t.Fatalf("only %d messages acknowledged", acked)
	}
}

func httpsGet(t *testing.T, g *testenv.Gateway, path string) []byte {
	t.Helper()
	cl := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots()}}}
	resp, err := cl.Get(g.URL() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	return b
}

// TestRetireForceClosesSessions: retirement is refused (409 ca_in_use)
// while an active device depends on the old CA; forced, it closes the
// device's live session, and the device's old certificate is refused from
// then on (handshake and admin API), while a device on the new CA stays.
func TestRetireForceClosesSessions(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	oldID := g.CA.Current().ID
	stale := &fleetDevice{d: g.EnrollDevice(t, "stale", "lab"), g: g}
	if err := stale.connect(); err != nil {
		t.Fatal(err)
	}
	defer stale.close()
	if _, err := g.Admin.CARotate(ctx); err != nil {
		t.Fatal(err)
	}
	moved := &fleetDevice{d: g.EnrollDevice(t, "moved", "lab"), g: g} // enrolled after: on the new CA
	if err := moved.connect(); err != nil {
		t.Fatal(err)
	}
	defer moved.close()
	_, err := g.Admin.CARetire(ctx, oldID, false)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.ReasonCAInUse || ae.Status != http.StatusConflict {
		t.Fatalf("retire without --force: %v", err)
	}
	if !stale.connected() {
		t.Fatal("the refused retirement closed a session")
	}
	r, err := g.Admin.CARetire(ctx, oldID, true)
	if err != nil {
		t.Fatal(err)
	}
	if r.SessionsClosed != 1 || r.Issuer.ActiveDevices != 1 {
		t.Fatalf("forced retirement: %+v", r)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if stale.connected() {
			return errors.New("the old CA's session is still open")
		}
		return nil
	})
	if !moved.connected() {
		t.Fatal("a session on the new CA was closed")
	}
	if err := stale.connect(); err == nil {
		t.Fatal("a retired CA's certificate was admitted again")
	}
	if err := stale.d.Renew(ctx); err == nil {
		t.Fatal("renewal with a retired CA's certificate succeeded")
	}
	if _, err := g.Admin.CARetire(ctx, oldID, true); !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized {
		t.Fatalf("the old CA's operator certificate after the retirement: %v", err)
	}
	admin, err := client.New(g.URL(), client.FromDataDir(g.DataDir)) // re-issued at the rotation
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CARetire(ctx, oldID, true); !errors.As(err, &ae) || ae.Status != http.StatusConflict {
		t.Fatalf("second retirement: %v", err)
	}
}

func (f *fleetDevice) connected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.c != nil && f.c.IsConnectionOpen()
}

// TestCRLPerIssuingCA: each trusted issuing CA has its CRL, signed by it,
// listing exactly the revoked certificates it issued; a revocation shows
// at once; a retired CA has none.
func TestCRLPerIssuingCA(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	oldDev := g.EnrollDevice(t, "crl-old", "lab")
	rot, err := g.Admin.CARotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	newDev := g.EnrollDevice(t, "crl-new", "lab")
	a, err := ca.Load(g.DataDir, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	oldID, newID := a.IssuerOf(oldDev.Leaf()).ID, rot.Issuer.ID
	crl := func(id string) map[string]bool {
		t.Helper()
		rl, err := x509.ParseRevocationList(httpsGet(t, g, api.PathCRLIssuer+id))
		if err != nil {
			t.Fatal(err)
		}
		iss, _ := a.Issuer(id)
		if err := rl.CheckSignatureFrom(iss.Cert); err != nil {
			t.Fatalf("CRL of %s: %v", id, err)
		}
		out := map[string]bool{}
		for _, e := range rl.RevokedCertificateEntries {
			out[ca.SerialString(e.SerialNumber)] = true
		}
		return out
	}
	if len(crl(oldID)) != 0 || len(crl(newID)) != 0 {
		t.Fatal("CRLs not empty before any revocation")
	}
	for _, id := range []string{"crl-old", "crl-new"} {
		if _, err := g.Admin.DeviceAction(ctx, id, "revoke", "crl test"); err != nil {
			t.Fatal(err)
		}
	}
	oldSerial, newSerial := ca.SerialString(oldDev.Leaf().SerialNumber), ca.SerialString(newDev.Leaf().SerialNumber)
	if c := crl(oldID); !c[oldSerial] || c[newSerial] {
		t.Fatalf("old CA's CRL: %v", c)
	}
	if c := crl(newID); !c[newSerial] || c[oldSerial] {
		t.Fatalf("new CA's CRL: %v", c)
	}
	var ir api.CAIssuersResponse
	if err := json.Unmarshal(httpsGet(t, g, api.PathCAIssuers), &ir); err != nil {
		t.Fatal(err)
	}
	if ir.Current != newID || len(ir.Trusted) != 2 {
		t.Fatalf("issuers: %+v", ir)
	}
	if _, err := g.Admin.CARetire(ctx, oldID, false); err != nil {
		t.Fatal(err) // its only device is revoked: nothing depends on it
	}
	cl := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots()}}}
	resp, err := cl.Get(g.URL() + api.PathCRLIssuer + oldID)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("CRL of a retired CA: %d", resp.StatusCode)
	}
}
