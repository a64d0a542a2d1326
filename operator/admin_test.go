package operator_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/operator/client"
)

func adminCert(t *testing.T, g *testenv.Gateway) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(g.DataDir, ca.OperatorCertFile), filepath.Join(g.DataDir, ca.OperatorKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// deviceMQTT connects an enrolled device.
func deviceMQTT(t *testing.T, g *testenv.Gateway, id, group string) paho.Client {
	t.Helper()
	d := g.EnrollDevice(t, id, group)
	tcfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := g.MQTT(t, id, nil, func(o *paho.ClientOptions) { o.SetTLSConfig(tcfg) })
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func wait(t *testing.T, tok paho.Token) {
	t.Helper()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("mqtt: %v", tok.Error())
	}
}

// TestAdminAPIBadInput: every new endpoint refuses malformed and unknown
// input with a 4xx whose code is stable, and a 404 names what is missing.
func TestAdminAPIBadInput(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	deviceMQTT(t, g, "sensor-1", "lab")
	admin := adminCert(t, g)
	for _, tc := range []struct {
		method, path, body string
		status             int
		code, msg          string
	}{
		{"POST", "/v1/admin/tokens/zz/revoke", "", 400, "invalid_token_id", ""},
		{"POST", "/v1/admin/tokens/0123456789abcdef/revoke", "", 404, "not_found", "token 0123456789abcdef not found"},
		{"GET", "/v1/admin/tokens?state=bogus", "", 400, "invalid_state", ""},
		{"GET", "/v1/admin/devices?limit=0", "", 400, "invalid_limit", ""},
		{"GET", "/v1/admin/devices?online=maybe", "", 400, "invalid_online", ""},
		{"GET", "/v1/admin/devices?state=lost", "", 400, "invalid_state", ""},
		{"GET", "/v1/admin/devices/nope", "", 404, "not_found", "device nope not found"},
		{"POST", "/v1/admin/devices/nope/suspend", "", 404, "not_found", "device nope not found"},
		{"POST", "/v1/admin/devices/sensor-1/revoke", `{"reason":"x","reason_code":"bogus"}`, 400, "invalid_reason_code", "keyCompromise"},
		{"GET", "/v1/admin/services/Bad_Name", "", 400, "invalid_name", ""},
		{"GET", "/v1/admin/services/nope", "", 404, "not_found", "service nope not found"},
		{"POST", "/v1/admin/services/nope/renew", "{}", 404, "not_found", "service nope not found"},
		{"POST", "/v1/admin/services/nope/revoke", `{"reason":"x"}`, 404, "not_found", "service nope not found"},
		{"POST", "/v1/admin/services/nope/revoke", `{`, 400, "reason_required", ""},
		{"POST", "/v1/admin/services/nope/renew", `{"csr":"bm90IGEgY3Ny"}`, 404, "not_found", ""},
		{"POST", "/v1/admin/operators", `{`, 400, "", ""},
		{"POST", "/v1/admin/operators", `{"name":"x","role":"god"}`, 400, "invalid_role", ""},
		{"POST", "/v1/admin/operators", `{"name":"Not Valid"}`, 400, "invalid_name", ""},
		{"POST", "/v1/admin/operators", `{"name":"admin"}`, 409, "name_taken", ""},
		{"POST", "/v1/admin/operators", `{"name":"sensor-1"}`, 409, "name_taken", ""},
		{"POST", "/v1/admin/operators/nope/remove", `{"reason":"x"}`, 404, "not_found", "operator nope not found"},
		{"POST", "/v1/admin/operators/admin/remove", `{"reason":"x"}`, 409, "last_admin", "last admin"},
		{"GET", "/v1/admin/clients/nope", "", 404, "not_found", "client nope not found"},
		{"GET", "/v1/admin/clients/Bad!", "", 400, "invalid_client_id", ""},
		{"POST", "/v1/admin/clients/nope/disconnect", "", 404, "not_found", "client nope not found"},
		{"GET", "/v1/admin/clients?online=perhaps", "", 400, "invalid_online", ""},
		{"GET", "/v1/admin/retained?filter=a/%23/b", "", 400, "invalid_filter", ""},
		{"DELETE", "/v1/admin/retained?topic=a/%2B", "", 400, "invalid_topic", ""},
		{"DELETE", "/v1/admin/retained?topic=no/such", "", 404, "not_found", "retained message on topic no/such not found"},
		{"POST", "/v1/admin/groups/lab/explode", "", 404, "unknown_action", ""},
		{"POST", "/v1/admin/groups/nogroup/suspend", "", 404, "not_found", "group nogroup not found"},
		{"POST", "/v1/admin/groups/lab/revoke", "", 400, "reason_required", ""},
		{"POST", "/v1/admin/groups/Lab!/revoke", `{"reason":"x"}`, 400, "invalid_group", ""},
		{"POST", "/v1/admin/groups/lab/suspend", `{`, 400, "", ""},
		{"POST", "/v1/admin/groups/lab/revoke", `{"reason":"x","reason_code":"nope"}`, 400, "invalid_reason_code", ""},
		{"POST", "/v1/admin/operators", `{"name":"x","unknown_field":1}`, 400, "", ""},
		{"POST", "/v1/admin/services/nope/renew", `{"ttl":"soon"}`, 400, "", ""},
	} {
		status, e := g.Call(t, admin, tc.method, tc.path, tc.body)
		if status != tc.status || (tc.code != "" && e.Code != tc.code) || !strings.Contains(e.Message, tc.msg) {
			t.Errorf("%s %s %s: %d %s %q, want %d %s %q", tc.method, tc.path, tc.body, status, e.Code, e.Message, tc.status, tc.code, tc.msg)
		}
	}
	// Nothing was changed by the refused requests.
	d, err := g.Admin.Device(context.Background(), "sensor-1")
	if err != nil || d.State != "active" || !d.Online {
		t.Fatalf("sensor-1 after refusals: %+v %v", d, err)
	}
}

// newCSR returns a CSR and its key.
func newCSR(t *testing.T) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		t.Fatal(err)
	}
	return csr, k
}

// addOperator adds an operator by CSR and returns its client.
func addOperator(t *testing.T, g *testenv.Gateway, name, role string) (*client.Client, tls.Certificate) {
	t.Helper()
	csr, k := newCSR(t)
	r, err := g.Admin.AddOperator(context.Background(), api.OperatorAddRequest{Name: name, Role: role, CSR: csr})
	if err != nil {
		t.Fatalf("add operator %s: %v", name, err)
	}
	if r.PrivateKeyPEM != "" {
		t.Fatal("the server sent a key for a CSR")
	}
	dir := t.TempDir()
	kp, _ := ca.KeyPEM(k)
	cr := client.Credentials{CertFile: filepath.Join(dir, "c.pem"), KeyFile: filepath.Join(dir, "k.pem"), CAFile: filepath.Join(g.DataDir, ca.RootCertFile)}
	if err := os.WriteFile(cr.CertFile, []byte(r.CertificateChainPEM), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cr.KeyFile, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(g.URL(), cr)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(cr.CertFile, cr.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return cl, cert
}

// TestOperatorRoles: a read-only operator reads and is refused every
// change with 403 operator_read_only, audited with its name; operators
// can be added and removed, never the last admin.
func TestOperatorRoles(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	viewer, viewerCert := addOperator(t, g, "viewer", api.OperatorReadOnly)
	if _, err := viewer.Devices(ctx); err != nil {
		t.Fatalf("read-only operator cannot read: %v", err)
	}
	if o, err := viewer.WhoAmI(ctx); err != nil || o.Role != api.OperatorReadOnly || o.Name != "viewer" {
		t.Fatalf("whoami: %+v %v", o, err)
	}
	for _, c := range []struct{ method, path, body string }{
		{"POST", api.PathAdminTokens, `{"device_id":"x"}`},
		{"POST", "/v1/admin/devices/x/suspend", ""},
		{"POST", api.PathAdminOperators, `{"name":"sneaky","role":"admin"}`},
		{"POST", "/v1/admin/operators/admin/remove", `{"reason":"x"}`},
		{"DELETE", "/v1/admin/retained?topic=a", ""},
		{"POST", api.PathAdminPolicyReload, "{}"},
	} {
		status, e := g.Call(t, viewerCert, c.method, c.path, c.body)
		if status != http.StatusForbidden || e.Code != "operator_read_only" {
			t.Errorf("read-only %s %s: %d %s", c.method, c.path, status, e.Code)
		}
	}
	// Diagnose is a POST that changes nothing: a read-only operator may
	// ask why a certificate is refused (an empty body is malformed, not
	// forbidden).
	if status, e := g.Call(t, viewerCert, "POST", api.PathAdminDiagnose, `{}`); status == http.StatusForbidden {
		t.Errorf("read-only diagnose: %d %s", status, e.Code)
	}
	recs, err := g.Admin.Audit(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	denied := 0
	for _, r := range recs {
		if r.Actor == "operator/viewer" && r.Outcome == "denied" && r.Reason == "operator_read_only" {
			denied++
		}
	}
	if denied != 6 {
		t.Fatalf("%d audited read-only refusals, want 6", denied)
	}
	if _, err := g.Admin.Operators(ctx, nil); err != nil {
		t.Fatal(err)
	}
	// A second admin may remove the first; the last one stays.
	admin2, _ := addOperator(t, g, "admin2", api.OperatorAdmin)
	if _, err := admin2.RemoveOperator(ctx, "admin", "handover"); err != nil {
		t.Fatalf("remove admin: %v", err)
	}
	var e *api.Error
	if _, err := admin2.RemoveOperator(ctx, "admin2", "oops"); !errors.As(err, &e) || e.Code != "last_admin" || e.Status != http.StatusConflict {
		t.Fatalf("removing the last admin: %v", err)
	}
	// The removed admin's certificate no longer opens the API.
	if _, err := g.Admin.Devices(ctx); !errors.As(err, &e) || e.Status != http.StatusUnauthorized {
		t.Fatalf("removed admin still calls the API: %v", err)
	}
	ops, err := admin2.Operators(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, o := range ops {
		got[o.Name] = o.Role + "/" + o.State
	}
	if got["admin"] != "none/revoked" || got["admin2"] != "admin/active" || got["viewer"] != "read-only/active" {
		t.Fatalf("operators: %v", got)
	}
}

// TestRevokeSaysWhetherASessionWasClosed: revoke and suspend report a
// live session that was closed, and no session when there was none.
func TestRevokeSaysWhetherASessionWasClosed(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	deviceMQTT(t, g, "online-1", "lab")
	g.EnrollDevice(t, "offline-1", "lab")
	r, err := g.Admin.DeviceAction(ctx, "online-1", "suspend", "maintenance")
	if err != nil || !r.WasOnline || !r.SessionsClosed {
		t.Fatalf("suspend of a connected device: %+v %v", r, err)
	}
	r, err = g.Admin.DeviceAction(ctx, "offline-1", "revoke", "scrapped")
	if err != nil || r.WasOnline || r.SessionsClosed {
		t.Fatalf("revoke of an offline device: %+v %v", r, err)
	}
	deviceMQTT(t, g, "online-2", "lab2")
	gr, err := g.Admin.GroupAction(ctx, "lab2", "revoke", api.StateChangeRequest{Reason: "site closed"})
	if err != nil || len(gr.Devices) != 1 || gr.SessionsClosed != 1 {
		t.Fatalf("group revoke: %+v %v", gr, err)
	}
}

// TestCRLReasonCodes: the CRL carries the reason code of each
// revocation, as openssl reads it.
func TestCRLReasonCodes(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	g.EnrollDevice(t, "stolen-1", "lab")
	g.EnrollDevice(t, "plain-1", "lab")
	g.Service(t, "old-backend")
	if _, err := g.Admin.DeviceAction(ctx, "stolen-1", "revoke", "stolen from the van"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.DeviceAction(ctx, "plain-1", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.RevokeService(ctx, "old-backend", api.StateChangeRequest{Reason: "moved", ReasonCode: "cessationOfOperation"}); err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots()}}}
	resp, err := hc.Get(g.URL() + api.PathCRL)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	cmd := exec.Command("openssl", "crl", "-inform", "DER", "-noout", "-text")
	cmd.Stdin = bytes.NewReader(der)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("openssl crl: %v\n%s", err, out)
	}
	text := string(out)
	if strings.Count(text, "Serial Number:") != 3 || strings.Count(text, "Key Compromise") != 1 || strings.Count(text, "Cessation Of Operation") != 1 {
		t.Fatalf("CRL entries and reasons:\n%s", text)
	}
}

// TestServiceSeveralConnections: a service connects as <name> and
// <name>:<suffix> at once, without taking over; a device cannot use a
// suffix; a shared subscription spreads messages over the connections;
// clients list shows each and disconnect closes one.
func TestServiceSeveralConnections(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	dev := deviceMQTT(t, g, "sensor-1", "lab")
	svc := g.Service(t, "backend")
	got := make(chan string, 100)
	var conns []paho.Client
	for _, id := range []string{"backend", "backend:a"} {
		c, err := g.MQTT(t, id, &svc)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		wait(t, c.Subscribe("$share/workers/devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- id }))
		conns = append(conns, c)
	}
	if _, err := g.MQTT(t, "backend:Bad!", &svc); err == nil {
		t.Fatal("a suffix outside [a-z0-9-] was accepted")
	}
	if _, err := g.MQTT(t, "other:a", &svc); err == nil {
		t.Fatal("a service used another name's client ID")
	}
	for i := range 20 {
		wait(t, dev.Publish("devices/sensor-1/telemetry/t", 1, false, []byte{byte(i)}))
	}
	seen := map[string]int{}
	for range 20 {
		select {
		case id := <-got:
			seen[id]++
		case <-time.After(10 * time.Second):
			t.Fatalf("messages missing: %v", seen)
		}
	}
	select {
	case id := <-got:
		t.Fatalf("a message delivered twice (to %s): %v", id, seen)
	case <-time.After(200 * time.Millisecond):
	}
	for _, c := range conns {
		if !c.IsConnectionOpen() {
			t.Fatal("a connection of the service was taken over")
		}
	}
	cs, err := g.Admin.Clients(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]api.Client{}
	for _, c := range cs {
		ids[c.ClientID] = c
	}
	if ids["backend:a"].Identity != "service/backend" || !ids["backend"].Online || ids["sensor-1"].Remote == "" || ids["sensor-1"].Since.IsZero() {
		t.Fatalf("clients: %+v", cs)
	}
	if s, err := g.Admin.Service(ctx, "backend"); err != nil || s.Online != 2 {
		t.Fatalf("service backend: %+v %v", s, err)
	}
	r, err := g.Admin.Disconnect(ctx, "backend:a")
	if err != nil || !r.WasOnline {
		t.Fatalf("disconnect: %+v %v", r, err)
	}
	testenv.Eventually(t, 5*time.Second, func() error {
		if conns[1].IsConnectionOpen() {
			return errors.New("backend:a still connected")
		}
		return nil
	})
	if !conns[0].IsConnectionOpen() {
		t.Fatal("disconnecting backend:a closed backend")
	}
	// Retained messages: listed, deleted.
	wait(t, dev.Publish("devices/sensor-1/state", 1, true, "on"))
	ms, err := g.Admin.Retained(ctx, nil)
	if err != nil || len(ms) != 1 || ms[0].Topic != "devices/sensor-1/state" || ms[0].Publisher != "sensor-1" || string(ms[0].Payload) != "on" {
		t.Fatalf("retained: %+v %v", ms, err)
	}
	if d, err := g.Admin.DeleteRetained(ctx, "devices/sensor-1/state"); err != nil || d.Deleted != 1 {
		t.Fatalf("delete retained: %+v %v", d, err)
	}
	if ms, _ := g.Admin.Retained(ctx, nil); len(ms) != 0 {
		t.Fatalf("retained after delete: %+v", ms)
	}
	p, err := g.Admin.Policy(ctx)
	if err != nil || p.File != "built-in default" || !strings.Contains(p.YAML, "device-telemetry") || p.Rules == 0 {
		t.Fatalf("policy: %+v %v", p, err)
	}
}

// TestServiceReplicaSessionSurvivesRestart: a persistent session of
// <name>:<suffix> is restored after a restart and gets the messages
// queued for it while it was offline, checked as its service's identity.
func TestServiceReplicaSessionSurvivesRestart(t *testing.T) {
	dir := testenv.Init(t)
	g := testenv.Start(t, testenv.Options{DataDir: dir})
	svc := g.Service(t, "backend")
	persistent := func(o *paho.ClientOptions) { o.SetCleanSession(false) }
	c, err := g.MQTT(t, "backend:r2", &svc, persistent)
	if err != nil {
		t.Fatal(err)
	}
	wait(t, c.Subscribe("devices/+/telemetry/#", 1, nil))
	c.Disconnect(100)
	g.Stop()

	g = testenv.Start(t, testenv.Options{DataDir: dir})
	dev := deviceMQTT(t, g, "sensor-9", "lab")
	wait(t, dev.Publish("devices/sensor-9/telemetry/t", 1, false, "while offline"))
	got := make(chan string, 1)
	_, err = g.MQTT(t, "backend:r2", &svc, persistent, func(o *paho.ClientOptions) {
		o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) })
	})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m != "while offline" {
			t.Fatalf("got %q", m)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the replica's queued message was not delivered after the restart")
	}
}

// TestRevokedTokenCannotEnroll: a revoked token is listed as revoked and
// refused at enrollment; a used token cannot be revoked.
func TestRevokedTokenCannotEnroll(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	tok := g.Token(t, "late-1", "lab", time.Hour)
	g.EnrollDevice(t, "early-1", "lab")
	ts, err := g.Admin.Tokens(ctx, nil)
	if err != nil || len(ts) != 2 {
		t.Fatalf("tokens: %+v %v", ts, err)
	}
	states := map[string]api.Token{}
	for _, x := range ts {
		states[x.DeviceID] = x
	}
	if states["late-1"].State != "unused" || states["early-1"].State != "used" {
		t.Fatalf("states: %+v", states)
	}
	if r, err := g.Admin.RevokeToken(ctx, states["late-1"].ID); err != nil || r.State != "revoked" {
		t.Fatalf("revoke: %+v %v", r, err)
	}
	var e *api.Error
	if err := g.Device(t, "late-1").EnrollWithToken(ctx, tok); !errors.As(err, &e) || e.Code != "token_expired" {
		t.Fatalf("enrollment with a revoked token: %v", err)
	}
	if _, err := g.Admin.RevokeToken(ctx, states["early-1"].ID); !errors.As(err, &e) || e.Status != http.StatusConflict {
		t.Fatalf("revoking a used token: %v", err)
	}
	if ts, err := g.Admin.Tokens(ctx, map[string][]string{"state": {"revoked"}}); err != nil || len(ts) != 1 || ts[0].DeviceID != "late-1" {
		t.Fatalf("revoked tokens: %+v %v", ts, err)
	}
}
