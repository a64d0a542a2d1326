package console

import (
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/identity"
)

// A stream whose queue is full is dropped; the others keep theirs.
func TestSlowStreamIsDropped(t *testing.T) {
	o := Options{StreamBuffer: 4}
	o.defaults()
	h := newHub(o)
	slow, err := h.add("s1")
	if err != nil {
		t.Fatal(err)
	}
	fast, _ := h.add("s2")
	for i := range 10 {
		h.publish(event{Type: "device", Device: "d", Count: i})
		select {
		case <-fast.ch:
		default:
		}
	}
	select {
	case <-slow.dropped:
	default:
		t.Fatal("slow stream not dropped")
	}
	select {
	case <-fast.dropped:
		t.Fatal("fast stream dropped")
	default:
	}
	if live, dropped := h.counts(); live != 1 || dropped != 1 {
		t.Fatalf("live %d dropped %d", live, dropped)
	}
	h.remove(slow) // the handler's deferred remove is harmless
	if live, _ := h.counts(); live != 1 {
		t.Fatalf("live %d", live)
	}
}

// Links are kept as hashes only.
func TestLinksAreStoredHashed(t *testing.T) {
	o := Options{}
	o.defaults()
	a := newAuth(o, nil, "https://x")
	res, err := a.mint(identity.Identity{Role: identity.RoleOperator, Name: "admin"}, "1")
	if err != nil {
		t.Fatal(err)
	}
	tok := res.URL[strings.Index(res.URL, "t=")+2:]
	id, secret, _ := strings.Cut(tok, ".")
	l := a.links[id]
	if l == nil || l.hash != sha256.Sum256([]byte(secret)) {
		t.Fatal("link not stored as the hash of its secret")
	}
	if res.ExpiresAt.After(time.Now().Add(o.LinkTTL)) {
		t.Fatal("link lives too long")
	}
	for range o.MaxLinks - 1 {
		if _, err := a.mint(identity.Identity{Role: identity.RoleOperator, Name: "admin"}, "1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.mint(identity.Identity{Role: identity.RoleOperator, Name: "admin"}, "1"); err != errLinksFull {
		t.Fatalf("link %d: %v", o.MaxLinks+1, err)
	}
}
