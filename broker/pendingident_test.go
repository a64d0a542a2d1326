package broker_test

import (
	"crypto/tls"
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// limitHits returns the count of limit_hits_total{limit=name} (0: none).
func limitHits(t *testing.T, g *testenv.Gateway, name string) int {
	t.Helper()
	m := regexp.MustCompile(`fleetgate_broker_limit_hits_total\{limit="` + name + `"\} (\d+)`).FindStringSubmatch(g.Metrics(t))
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// One device credential (compromised, not yet revoked) opens many TLS
// connections that complete the handshake and never send CONNECT. They
// cannot hold every pending slot: beyond a few per identity the oldest is
// closed (counted as pending_per_identity), and another device connects.
func TestOneIdentityCannotHoldEveryPendingSlot(t *testing.T) {
	const maxPending, opens = 12, 30
	g := testenv.Start(t, testenv.Options{MaxPending: maxPending, HandshakeTimeout: time.Minute})
	hog := certOf(t, g.EnrollDevice(t, "hog", "lab"))
	other := certOf(t, g.EnrollDevice(t, "other", "lab"))
	var conns []*tls.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	opened := 0
	for i := 0; i < opens; i++ {
		c, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{hog}})
		if err != nil {
			continue // refused
		}
		conns = append(conns, c) // never sends CONNECT
		opened++
	}
	if err := connectFrom(g, srcIP(40, 0), "other", other, 10*time.Second); err != nil {
		t.Fatalf("another device could not connect while one identity opened %d connections without CONNECT: %v", opened, err)
	}
	// Each connection past the first few of the identity evicted its
	// oldest one waiting for CONNECT.
	testenv.Eventually(t, 10*time.Second, func() error {
		if n := limitHits(t, g, "pending_per_identity"); n != opened-4 {
			return fmt.Errorf("%d connections of the identity evicted, want %d of %d", n, opened-4, opened)
		}
		return nil
	})
	if n := limitHits(t, g, "pending_limit"); n != 0 {
		t.Fatalf("%d connections refused with every pending slot taken", n)
	}
	// The identity itself still connects: its newest connection evicts its
	// oldest one waiting for CONNECT.
	if err := connectFrom(g, srcIP(40, 1), "hog", hog, 10*time.Second); err != nil {
		t.Fatalf("the identity's own connect refused: %v", err)
	}
}
