package broker_test

import (
	"bufio"
	"crypto/tls"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestWSSUpgradeRefusalsAreLogged (review): a connection that passed the
// TLS handshake with a device certificate but whose HTTP upgrade is
// refused (a cross-origin page, a request that is no upgrade, a stalled
// one) is a refusal: it is logged with its reason and the identity, and
// bounded per source.
func TestWSSUpgradeRefusalsAreLogged(t *testing.T) {
	g := startWSS(t)
	cert := certOf(t, g.EnrollDevice(t, "ws-log", "lab"))
	dial := func() *tls.Conn {
		c, err := tls.Dial("tcp", g.Addrs.WSS, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	}
	c := dial()
	_, _ = c.Write([]byte("GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\nOrigin: https://evil.example\r\n\r\n"))
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("cross-origin upgrade: %v %v", resp, err)
	}
	logged := func(want ...string) bool {
		for _, l := range strings.Split(g.Logs.String(), "\n") {
			ok := strings.Contains(l, "wss upgrade refused")
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				return true
			}
		}
		return false
	}
	waitLogged := func(what string, want ...string) {
		t.Helper()
		for i := 0; i < 100 && !logged(want...); i++ {
			time.Sleep(50 * time.Millisecond)
		}
		if !logged(want...) {
			t.Errorf("%s: no log line with %q:\n%s", what, want, g.Logs.String())
		}
	}
	waitLogged("cross-origin upgrade", "identity=device/ws-log", "reason=upgrade_refused", "origin")
	// Stalled after the handshake: closed at the deadline, and logged.
	c = dial()
	buf := make([]byte, 1)
	_, _ = c.Read(buf)
	waitLogged("stalled upgrade", "ws-log", "reason=no_upgrade")

	// Bounded: a source's flood writes a few lines.
	for range 20 {
		c := dial()
		_, _ = c.Write([]byte("GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n"))
		_, _ = http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
	}
	time.Sleep(200 * time.Millisecond)
	if n := strings.Count(g.Logs.String(), "wss upgrade refused"); n > 12 {
		t.Errorf("22 refused upgrades wrote %d log lines", n)
	}
}
