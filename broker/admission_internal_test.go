package broker

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/identity"
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
			a.handshaken(e.Value.(*pending), identity.Identity{})
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
// victim comes from the address whose stalled connections keep being
// evicted, so a device's connection, alone on its address, stays even once
// it is the oldest (its ClientHello waiting for the CPU).
func TestAdmissionUnderFastChurnEvictsFromTheChurningAddress(t *testing.T) {
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
	// The flood from one address holds every slot, churning.
	for i := 0; i < 10; i++ {
		admit("flood", i)
	}
	dev, ev := admit("device", 10)
	if len(ev) != 1 || ev[0].ip != "flood" {
		t.Fatal("the device's admission did not evict a flood connection")
	}
	for i := 11; i < 110; i++ {
		_, ev := admit("flood", i)
		if len(ev) != 1 || ev[0].ip != "flood" {
			t.Fatalf("newcomer %d: want one flood connection evicted, got %d", i, len(ev))
		}
	}
	if dev.evicted {
		t.Fatal("the device's connection was evicted")
	}
	// Past the grace, the oldest stalled connection goes, whoever holds it.
	_, ev = admit("flood", 1010)
	if len(ev) != 1 || ev[0] != dev {
		t.Fatal("a connection stalled past the grace was kept")
	}
}

// The reviewer's scenario: a flood that opens one stalled connection per
// source address, from many addresses, churning (each evicted connection
// reconnects at once from its address, or from a fresh one), while a fleet
// behind one NAT address reconnects together. The fleet's address holds the
// most stalled connections, but its connections progress (their
// ClientHellos arrive); the flood's never do. Every fleet connection must
// survive until its ClientHello.
func TestAdmissionManyAddressFloodDoesNotEvictANATFleet(t *testing.T) {
	for _, fresh := range []bool{false, true} {
		name := "flood reuses its addresses"
		if fresh {
			name = "flood uses a fresh address per connection"
		}
		t.Run(name, func(t *testing.T) {
			const max, fleet, floodAddrs = 10, 5, 40
			t0 := time.Unix(1000, 0)
			ms := 0
			a := newAdmission(max, 64, time.Second)
			next := 0 // the flood's next source address
			admit := func(ip string) *pending {
				t.Helper()
				ms++ // fast churn: far below the grace
				c, peer := net.Pipe()
				peer.Close()
				p, _, reason := a.admit(c, ip, t0.Add(time.Duration(ms)*time.Millisecond))
				if p == nil {
					t.Fatalf("%s refused: %s", ip, reason)
				}
				return p
			}
			floodOne := func() {
				ip := fmt.Sprintf("flood-%d", next%floodAddrs)
				if fresh {
					ip = fmt.Sprintf("flood-%d", next)
				}
				next++
				admit(ip)
			}
			// The flood holds every slot, churning.
			for i := 0; i < 5*max; i++ {
				floodOne()
			}
			// The fleet reconnects at once: five stalled connections from
			// one address, the newest of all.
			var devs []*pending
			for i := 0; i < fleet; i++ {
				devs = append(devs, admit("nat"))
			}
			// Their ClientHellos wait for the CPU while the flood makes
			// more connections; they arrive one by one.
			for _, d := range devs {
				floodOne()
				if !a.hello(d) {
					t.Fatalf("a fleet connection was evicted before its ClientHello (%d flood connections so far)", next)
				}
			}
			for _, d := range devs {
				a.release(d) // TLS handshake and CONNECT done
			}
			// The flood goes on; the fleet's next reconnect burst is
			// admitted too.
			devs = devs[:0]
			for i := 0; i < fleet; i++ {
				devs = append(devs, admit("nat"))
			}
			for i := 0; i < max/2; i++ {
				floodOne()
			}
			for _, d := range devs {
				if !a.hello(d) {
					t.Fatal("a fleet connection of the second burst was evicted before its ClientHello")
				}
			}
		})
	}
}

// IPv6 sources are grouped by /64 (one host, or one customer, usually holds
// a whole /64): a flood from many addresses of one /64 is one address for
// the per-address cap, eviction and refusal logs.
func TestHostOfGroupsIPv6By64(t *testing.T) {
	h := func(s string) string { return hostOf(&net.TCPAddr{IP: net.ParseIP(s), Port: 1234}) }
	if a, b := h("2001:db8:1:2::1"), h("2001:db8:1:2:ffff:1:2:3"); a != b {
		t.Fatalf("same /64 grouped as %q and %q", a, b)
	}
	if a, b := h("2001:db8:1:2::1"), h("2001:db8:1:3::1"); a == b {
		t.Fatalf("different /64s grouped as one: %q", a)
	}
	if got := h("192.0.2.7"); got != "192.0.2.7" {
		t.Fatalf("IPv4 source keyed as %q", got)
	}
	if got := h("::ffff:192.0.2.7"); got != "192.0.2.7" {
		t.Fatalf("IPv4-mapped source keyed as %q", got)
	}
	// The per-address cap applies to the /64: past the grace, a new
	// connection from another address of it evicts the prefix's oldest
	// stalled connection.
	t0 := time.Unix(1000, 0)
	a := newAdmission(100, 2, time.Second)
	var first *pending
	for i := 1; i <= 2; i++ {
		c, peer := net.Pipe()
		peer.Close()
		p, _, _ := a.admit(c, h(fmt.Sprintf("2001:db8:1:2::%x", i)), t0)
		if first == nil {
			first = p
		}
	}
	c, peer := net.Pipe()
	peer.Close()
	_, ev, _ := a.admit(c, h("2001:db8:1:2:abcd::9"), t0.Add(2*time.Second))
	if len(ev) != 1 || ev[0] != first || ev[0].reason != "pending_per_ip" {
		t.Fatalf("a third address of the /64 evicted %d connections, want its oldest for pending_per_ip", len(ev))
	}
}

// Connections waiting for CONNECT are capped per device identity: the
// identity's oldest one makes room; other identities, and services, are not
// touched.
func TestAdmissionCapsConnectionsWaitingForCONNECTPerDevice(t *testing.T) {
	a := newAdmission(100, 64, time.Second)
	t0 := time.Unix(1000, 0)
	handshaken := func(id identity.Identity) (*pending, []*pending) {
		t.Helper()
		c, peer := net.Pipe()
		peer.Close()
		p, _, reason := a.admit(c, "ip", t0)
		if p == nil {
			t.Fatalf("refused: %s", reason)
		}
		a.hello(p)
		ok, ev := a.handshaken(p, id)
		if !ok {
			t.Fatal("handshake of an admitted connection refused")
		}
		return p, ev
	}
	hog := identity.Identity{Role: identity.RoleDevice, Name: "hog"}
	var first []*pending
	for i := 0; i < defaultPendingPerIdentity; i++ {
		p, ev := handshaken(hog)
		if len(ev) != 0 {
			t.Fatalf("connection %d of the identity evicted %d", i, len(ev))
		}
		first = append(first, p)
	}
	other, _ := handshaken(identity.Identity{Role: identity.RoleDevice, Name: "other"})
	for i := 0; i < 10; i++ {
		_, ev := handshaken(hog)
		if len(ev) != 1 || ev[0].ident != "device/hog" || ev[0].reason != "pending_per_identity" {
			t.Fatalf("connection %d over the cap: %d evicted, want the identity's oldest", i, len(ev))
		}
		if i < len(first) && ev[0] != first[i] {
			t.Fatalf("connection %d over the cap evicted not the identity's oldest", i)
		}
	}
	if other.evicted {
		t.Fatal("another device's connection was evicted")
	}
	if a.n != defaultPendingPerIdentity+1 {
		t.Fatalf("%d pending, want %d", a.n, defaultPendingPerIdentity+1)
	}
	// A CONNECT processed frees the identity's place.
	q := a.connectByID["device/hog"]
	a.release(q.Front().Value.(*pending))
	if _, ev := handshaken(hog); len(ev) != 0 {
		t.Fatal("evicted although a place was freed")
	}
	// Services are not capped (a backend may open a pool at once).
	for i := 0; i < 2*defaultPendingPerIdentity; i++ {
		if _, ev := handshaken(identity.Identity{Role: identity.RoleService, Name: "backend"}); len(ev) != 0 {
			t.Fatal("a service's connection was evicted")
		}
	}
}
