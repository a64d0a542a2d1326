package broker

import (
	"net"
	"testing"
	"time"
)

// The admission rules step by step on the real structure (flood_test.go
// exercises them through the listener with real connections).
func TestAdmissionEvictsStalledFirstThenTheBusiestAddress(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	a := newAdmission(5, 2, time.Second)
	admit := func(ip string, when time.Time, wantEvicted ...string) *pending {
		t.Helper()
		c, peer := net.Pipe()
		peer.Close()
		p, ev, reason := a.admit(c, ip, when)
		if p == nil {
			t.Fatalf("%s refused: %s", ip, reason)
		}
		var got []string
		for _, e := range ev {
			got = append(got, e.ip+" "+string(e.reason))
		}
		if len(got) != len(wantEvicted) || (len(got) == 1 && got[0] != wantEvicted[0]) {
			t.Fatalf("admitting %s evicted %v, want %v", ip, got, wantEvicted)
		}
		return p
	}
	b1 := admit("ip2", at(0))
	a.hello(b1) // in its handshake: the oldest connection of all
	a1 := admit("ip1", at(100))
	a2 := admit("ip1", at(200))
	a3 := admit("ip1", at(300)) // three fresh stalled ones: over the cap of 2, none old enough to evict
	// Past the grace, the address's oldest stalled connection makes room.
	admit("ip1", at(2000), "ip1 pending_per_ip")
	if !a1.evicted {
		t.Fatal("a1 not the one evicted")
	}
	admit("ip3", at(2500))
	// Full: the oldest stalled connection (a2), not b1 in its handshake.
	admit("ip4", at(3000), "ip1 pending_evicted")
	if !a2.evicted {
		t.Fatal("a2 not the one evicted")
	}
	for e := a.stalled.Front(); e != nil; {
		next := e.Next()
		a.hello(e.Value.(*pending))
		e = next
	}
	// Nothing stalled: the oldest handshake of the busiest address (ip1,
	// two in their handshake) goes, not b1, the oldest handshake of all.
	e1 := admit("ip5", at(4000), "ip1 pending_evicted")
	if !a3.evicted || b1.evicted {
		t.Fatal("want a3 evicted and b1 kept")
	}
	// An evicted connection's late ClientHello is refused.
	if a.hello(a1) {
		t.Fatal("evicted connection accepted at its ClientHello")
	}
	// Every slot past its TLS handshake: a newcomer is refused.
	a.hello(e1)
	for _, q := range a.handshakeByIP {
		for e := q.Front(); e != nil; {
			next := e.Next()
			a.handshaken(e.Value.(*pending))
			e = next
		}
	}
	c, peer := net.Pipe()
	peer.Close()
	if p, _, reason := a.admit(c, "ip6", at(5000)); p != nil || reason != "pending_limit" {
		t.Fatalf("admitted with every slot waiting for CONNECT (reason %q)", reason)
	}
	if a.n != 5 {
		t.Fatalf("%d pending, want 5", a.n)
	}
	a.release(b1)
	a.release(b1)
	if a.n != 4 {
		t.Fatalf("%d pending after releasing one twice, want 4", a.n)
	}
}

// Under fast churn (every stalled connection younger than the grace) the
// victim comes from the address holding the most stalled connections, so
// a device's connection, alone on its address, stays even if it is the
// oldest.
func TestAdmissionUnderFastChurnEvictsFromTheBusiestAddress(t *testing.T) {
	t0 := time.Unix(1000, 0)
	a := newAdmission(4, 64, time.Second)
	admit := func(ip string, ms int) (*pending, []*pending) {
		t.Helper()
		c, peer := net.Pipe()
		peer.Close()
		p, ev, reason := a.admit(c, ip, t0.Add(time.Duration(ms)*time.Millisecond))
		if p == nil {
			t.Fatalf("%s refused: %s", ip, reason)
		}
		return p, ev
	}
	dev, _ := admit("device", 0)
	for i := 1; i <= 3; i++ {
		admit("flood", i)
	}
	for i := 4; i < 100; i++ {
		_, ev := admit("flood", i)
		if len(ev) != 1 || ev[0].ip != "flood" {
			t.Fatalf("newcomer %d: want one flood connection evicted, got %d", i, len(ev))
		}
	}
	if dev.evicted {
		t.Fatal("the device's connection was evicted")
	}
	// Past the grace, the oldest stalled connection goes, whoever holds it.
	_, ev := admit("flood", 1000)
	if len(ev) != 1 || ev[0] != dev {
		t.Fatal("a connection stalled past the grace was kept")
	}
}
