package broker_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

func startWSS(t *testing.T) *testenv.Gateway {
	t.Helper()
	cfg := testenv.Config(t, testenv.Options{})
	cfg.WSSListen = "127.0.0.1:0"
	cfg.HandshakeTimeout, cfg.HelloTimeout = 2*time.Second, time.Second
	g := testenv.StartConfig(t, cfg)
	if g.Addrs.WSS == "" {
		t.Fatal("no wss address in the address file")
	}
	return g
}

// wssClient connects paho.mqtt.golang over wss with cert (nil: none).
func wssClient(t *testing.T, g *testenv.Gateway, id string, cert *tls.Certificate, lost chan<- error) (paho.Client, error) {
	t.Helper()
	tcfg := &tls.Config{RootCAs: g.Roots(), ServerName: "localhost"}
	if cert != nil {
		tcfg.Certificates = []tls.Certificate{*cert}
	}
	o := paho.NewClientOptions().AddBroker("wss://" + g.Addrs.WSS + "/mqtt").SetClientID(id).SetTLSConfig(tcfg).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(10 * time.Second)
	if lost != nil {
		o.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

// TestWSSSameAdmissionPolicyAndRevocation: MQTT over WebSocket (paho over
// wss) is admitted as MQTT is: the device's certificate is required and
// checked, the client ID is the certificate's identity, the topic policy
// holds, and revoking the device closes its live wss session.
func TestWSSSameAdmissionPolicyAndRevocation(t *testing.T) {
	g := startWSS(t)
	w := watch(t, g)
	cert := certOf(t, g.EnrollDevice(t, "ws-1", "lab"))

	if _, err := wssClient(t, g, "ws-1", nil, nil); err == nil {
		t.Error("wss client without a certificate admitted")
	}
	if _, err := wssClient(t, g, "not-ws-1", &cert, nil); err == nil {
		t.Error("wss client with a foreign client ID admitted")
	}
	lost := make(chan error, 1)
	c, err := wssClient(t, g, "ws-1", &cert, lost)
	if err != nil {
		t.Fatalf("wss connect: %v", err)
	}
	got := make(chan string, 4)
	if tok := c.Subscribe("devices/ws-1/commands/#", 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	c.Publish("devices/ws-1/telemetry/t", 1, false, "over-wss").WaitTimeout(10 * time.Second)
	w.waitFor(t, "devices/ws-1/telemetry/t over-wss")
	// A command from a service reaches the device over wss.
	svcCert := g.Service(t, "cmd")
	svc, err := g.MQTT(t, "cmd", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	svc.Publish("devices/ws-1/commands/reboot", 1, false, "reboot").WaitTimeout(10 * time.Second)
	select {
	case p := <-got:
		if p != "reboot" {
			t.Errorf("command %q", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("command not delivered over wss")
	}
	// The policy holds: a foreign topic is not delivered.
	c.Publish("devices/other/commands/unlock", 0, false, "foreign").WaitTimeout(10 * time.Second)
	c.Publish("devices/ws-1/telemetry/t", 1, false, "marker").WaitTimeout(10 * time.Second)
	w.waitFor(t, "devices/ws-1/telemetry/t marker")
	if got := w.withPayload("foreign"); len(got) != 0 {
		t.Errorf("foreign publish over wss delivered: %v", got)
	}
	// Revocation closes the live wss session.
	if _, err := g.Admin.DeviceAction(context.Background(), "ws-1", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("revoked device's wss session not closed")
	}
	if _, err := wssClient(t, g, "ws-1", &cert, nil); err == nil {
		t.Error("revoked device admitted over wss")
	}
	if !strings.Contains(g.Logs.String(), "listener=wss") {
		t.Error("no wss refusal logged")
	}
}

// TestWSSUpgradeBounds: after the TLS handshake a stalled upgrade is closed
// at the handshake deadline, an oversized one is answered 431 and closed, a
// request that is not an upgrade 400; none reaches MQTT.
func TestWSSUpgradeBounds(t *testing.T) {
	g := startWSS(t)
	cert := certOf(t, g.EnrollDevice(t, "ws-b", "lab"))
	dial := func() *tls.Conn {
		c, err := tls.Dial("tcp", g.Addrs.WSS, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	}
	// Stalled: nothing after the TLS handshake.
	c := dial()
	if n, err := io.Copy(io.Discard, c); err == nil && n > 0 || err != nil && isTimeout(err) {
		t.Errorf("stalled upgrade: read %d bytes, %v (want closed by the broker)", n, err)
	}
	// Oversized header.
	c = dial()
	req := "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Pad: " + strings.Repeat("a", 32<<10) + "\r\n\r\n"
	go func() { _, _ = c.Write([]byte(req)) }()
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil && resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("oversized upgrade answered %s", resp.Status)
	}
	if _, err := io.Copy(io.Discard, c); isTimeout(err) {
		t.Error("oversized upgrade not closed")
	}
	// Not an upgrade.
	c = dial()
	_, _ = c.Write([]byte("GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n"))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Errorf("plain GET: %v %v", resp, err)
	}
	// A browser page on another origin cannot use a client certificate.
	c = dial()
	_, _ = c.Write([]byte("GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\nOrigin: https://evil.example\r\n\r\n"))
	resp, err = http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("cross-origin upgrade: %v %v", resp, err)
	}
	if strings.Contains(g.Metrics(t), "fleetgate_broker_connections{role=\"device\"} 1") {
		t.Error("a bounded upgrade reached MQTT")
	}
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
