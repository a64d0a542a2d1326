package broker_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// connack5 connects an MQTT 5 client (paho.golang) over conn and returns
// the CONNACK's reason code and reason string.
func connack5(t *testing.T, conn net.Conn, cp *paho5.Connect) (byte, string) {
	t.Helper()
	c := paho5.NewClient(paho5.ClientConfig{Conn: conn, OnClientError: func(error) {}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cp.KeepAlive = 30
	ack, err := c.Connect(ctx, cp)
	if ack == nil {
		t.Fatalf("no CONNACK: %v", err)
	}
	reason := ""
	if ack.Properties != nil {
		reason = ack.Properties.ReasonString
	}
	if ack.ReasonCode == 0 {
		_ = c.Disconnect(&paho5.Disconnect{})
	}
	return ack.ReasonCode, reason
}

func dialTLS(t *testing.T, g *testenv.Gateway, cert tls.Certificate, cache tls.ClientSessionCache) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost",
		Certificates: []tls.Certificate{cert}, ClientSessionCache: cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// ticketSeen is a session cache that tells when the server's session
// ticket arrived: the server sends it once it has read the client's
// certificate and Finished, i.e. once it has admitted the handshake.
type ticketSeen struct{ ch chan struct{} }

func (s ticketSeen) Get(string) (*tls.ClientSessionState, bool) { return nil, false }
func (s ticketSeen) Put(string, *tls.ClientSessionState) {
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// waitAdmitted reads (nothing arrives before CONNECT) until the server's
// session ticket was processed: the server's checks of the handshake ran.
func waitAdmitted(t *testing.T, conn *tls.Conn, seen ticketSeen) {
	t.Helper()
	for range 100 {
		_ = conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		var b [1]byte
		_, err := conn.Read(b[:])
		select {
		case <-seen.ch:
			_ = conn.SetReadDeadline(time.Time{})
			return
		default:
		}
		var ne net.Error
		if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("handshake not admitted: %v", err)
		}
	}
	t.Fatal("no session ticket from the server")
}

// TestConnackReasonCodes: a refused CONNECT is answered with the reason
// code of its cause (paho.golang, MQTT 5): a client ID that is not the
// certificate's identity 0x85, a Last Will the policy refuses 0x87, a
// device suspended or revoked between its TLS handshake and its CONNECT
// 0x87 / 0x8A; each counted under its reason and logged once.
func TestConnackReasonCodes(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	cert := certOf(t, g.EnrollDevice(t, "reason-dev", "lab"))

	code, reason := connack5(t, dialTLS(t, g, cert, nil), &paho5.Connect{ClientID: "someone-else", CleanStart: true})
	if code != 0x85 || reason != "client identifier not valid" {
		t.Errorf("client ID mismatch: CONNACK 0x%02x %q, want 0x85 client identifier not valid", code, reason)
	}
	code, _ = connack5(t, dialTLS(t, g, cert, nil), &paho5.Connect{ClientID: "reason-dev", CleanStart: true,
		WillMessage: &paho5.WillMessage{Topic: "devices/other/commands/x", Payload: []byte("w")}})
	if code != 0x87 {
		t.Errorf("will denied: CONNACK 0x%02x, want 0x87", code)
	}
	code, _ = connack5(t, dialTLS(t, g, cert, nil), &paho5.Connect{ClientID: "reason-dev", CleanStart: true})
	if code != 0 {
		t.Fatalf("own client ID: CONNACK 0x%02x", code)
	}

	// Suspended, then revoked, after the handshake was admitted.
	for _, c := range []struct {
		action string
		want   byte
	}{{"suspend", 0x87}, {"revoke", 0x8A}} {
		seen := ticketSeen{ch: make(chan struct{}, 1)}
		conn := dialTLS(t, g, cert, seen)
		waitAdmitted(t, conn, seen)
		if _, err := g.Admin.DeviceAction(ctx, "reason-dev", c.action, "test"); err != nil {
			t.Fatal(err)
		}
		if code, _ := connack5(t, conn, &paho5.Connect{ClientID: "reason-dev", CleanStart: true}); code != c.want {
			t.Errorf("%s between handshake and CONNECT: CONNACK 0x%02x, want 0x%02x", c.action, code, c.want)
		}
		if c.action == "suspend" {
			if _, err := g.Admin.DeviceAction(ctx, "reason-dev", "resume", "test"); err != nil {
				t.Fatal(err)
			}
		}
	}
	m := g.Metrics(t)
	for _, r := range []string{"client_id_mismatch", "will_denied", "suspended", "revoked"} {
		if !strings.Contains(m, `fleetgate_broker_auth_failures_total{reason="`+r+`"}`) {
			t.Errorf("refusal %s not counted", r)
		}
	}
	logs := g.Logs.String()
	if !strings.Contains(logs, `client_id=someone-else want_client_id=reason-dev`) {
		t.Errorf("client ID refusal not logged with both IDs:\n%s", logs)
	}
}

// TestConnackReasonWithMosquittoPub: the stock mosquitto client tells its
// user why it was refused, in MQTT 5 and in 3.1.1.
func TestConnackReasonWithMosquittoPub(t *testing.T) {
	if _, err := exec.LookPath("mosquitto_pub"); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatal("mosquitto_pub not installed")
		}
		t.Skip("mosquitto_pub not installed")
	}
	g := testenv.Start(t, testenv.Options{})
	certFile, keyFile := writePEMs(t, certOf(t, g.EnrollDevice(t, "mosq-why", "lab")))
	pub := func(version, clientID string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, _ := exec.CommandContext(ctx, "mosquitto_pub", "-V", version, "-h", "127.0.0.1", "-p", portOf(g.Addrs.MQTT),
			"--cafile", filepath.Join(g.DataDir, ca.RootCertFile), "--cert", certFile, "--key", keyFile, "--insecure",
			"-i", clientID, "-q", "1", "-t", "devices/mosq-why/telemetry/t", "-m", "x").CombinedOutput()
		return string(out)
	}
	out5, out311 := pub("mqttv5", "not-mosq-why"), pub("mqttv311", "not-mosq-why")
	t.Logf("mosquitto_pub -V mqttv5: %q; -V mqttv311: %q", out5, out311)
	if out := out5; !strings.Contains(strings.ToLower(out), "client identifier not valid") {
		t.Errorf("mosquitto_pub -V mqttv5 with a foreign client ID printed %q, want \"client identifier not valid\"", out)
	}
	if out := out311; !strings.Contains(strings.ToLower(out), "identifier rejected") {
		t.Errorf("mosquitto_pub -V mqttv311 with a foreign client ID printed %q, want \"identifier rejected\"", out)
	}
	if out := pub("mqttv5", "mosq-why"); strings.TrimSpace(out) != "" {
		t.Errorf("mosquitto_pub with its own client ID printed %q", out)
	}
}
