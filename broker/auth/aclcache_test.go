package auth

import (
	"fmt"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

const cacheTestPolicy = `rules:
  - name: lab
    roles: [device]
    groups: [lab]
    allow: [publish]
    topics: ["devices/{id}/telemetry/#"]
  - name: svc
    roles: [service]
    allow: [subscribe]
    topics: ["devices/#"]
`

// A cached allowed decision is not reused once anything it derives from
// changed: the device's group, the certificate (revoked, expired), the
// policy; and a denial is evaluated every time.
func TestACLCacheFollowsChanges(t *testing.T) {
	dir := directory.New()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	p1, err := acl.ParseFile("policy.yaml", []byte(cacheTestPolicy))
	if err != nil {
		t.Fatal(err)
	}
	var policy = p1
	h := New(Options{Directory: dir, Policy: func() *acl.Policy { mu.Lock(); defer mu.Unlock(); return policy }, Now: clock})

	dev := &fleet.Device{ID: "d1", Group: "lab", State: fleet.StateActive}
	cert := &fleet.Certificate{Serial: "01", Role: identity.RoleDevice, Name: "d1", NotAfter: now.Add(time.Hour)}
	dir.Issued(cert, dev)
	cl := &mqtt.Client{ID: "d1"}
	s := &Session{Identity: identity.Identity{Role: identity.RoleDevice, Name: "d1"}, Serial: "01", NotAfter: cert.NotAfter, Client: cl}
	h.sessions.Store("d1", s)
	svcCl := &mqtt.Client{ID: "svc"}
	dir.Issued(&fleet.Certificate{Serial: "02", Role: identity.RoleService, Name: "svc", NotAfter: now.Add(time.Hour)}, nil)
	h.sessions.Store("svc", &Session{Identity: identity.Identity{Role: identity.RoleService, Name: "svc"}, Serial: "02",
		NotAfter: now.Add(time.Hour), Client: svcCl})

	const topic = "devices/d1/telemetry/t"
	check := func(want bool, what string) {
		t.Helper()
		for i := 0; i < 3; i++ { // the first evaluates, the others may hit the cache
			if got := h.OnACLCheck(cl, topic, true); got != want {
				t.Fatalf("%s: publish allowed = %v (check %d)", what, got, i)
			}
		}
	}
	check(true, "lab device")
	if e := s.acl.pub.Load(); e == nil || e.topic != topic {
		t.Fatal("allowed decision not cached")
	}
	if h.OnACLCheck(cl, "devices/d2/telemetry/t", true) {
		t.Fatal("another device's topic allowed")
	}
	check(true, "lab device after a denial")

	dev.Group = "prod"
	dir.DeviceChanged(dev)
	check(false, "moved out of the lab group")
	dev.Group = "lab"
	dir.DeviceChanged(dev)
	check(true, "back in the lab group")

	p2, err := acl.ParseFile("policy.yaml", []byte("rules:\n  - name: none\n    roles: [service]\n    allow: [subscribe]\n    topics: [\"x/#\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	policy = p2
	mu.Unlock()
	check(false, "policy without the rule")
	mu.Lock()
	policy = p1
	mu.Unlock()
	check(true, "policy restored")

	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	check(false, "certificate expired")
	mu.Lock()
	now = now.Add(-2 * time.Hour)
	mu.Unlock()
	check(true, "clock back")

	// deliveries to the service: many topics, each cached in its slot
	for i := 0; i < 3000; i++ {
		if !h.OnACLCheck(svcCl, fmt.Sprintf("devices/d%d/telemetry", i%1500), false) {
			t.Fatalf("delivery %d refused", i)
		}
	}
	dir.Revoked("d1", "01")
	check(false, "certificate revoked")
	dir.Revoked("", "02")
	if h.OnACLCheck(svcCl, "devices/d1/telemetry", false) {
		t.Fatal("delivery to a revoked service allowed")
	}
}

// Concurrent checks, changes and policy swaps (for the race detector).
func TestACLCacheConcurrent(t *testing.T) {
	dir := directory.New()
	p, err := acl.ParseFile("policy.yaml", []byte(cacheTestPolicy))
	if err != nil {
		t.Fatal(err)
	}
	h := New(Options{Directory: dir, Policy: func() *acl.Policy { return p }})
	dev := &fleet.Device{ID: "d1", Group: "lab", State: fleet.StateActive}
	dir.Issued(&fleet.Certificate{Serial: "01", Role: identity.RoleDevice, Name: "d1", NotAfter: time.Now().Add(time.Hour)}, dev)
	cl := &mqtt.Client{ID: "d1"}
	h.sessions.Store("d1", &Session{Identity: identity.Identity{Role: identity.RoleDevice, Name: "d1"}, Serial: "01",
		NotAfter: time.Now().Add(time.Hour), Client: cl})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				h.OnACLCheck(cl, "devices/d1/telemetry/t", true)
				h.OnACLCheck(cl, fmt.Sprintf("devices/d1/commands/%d", i%7), false)
			}
		}()
	}
	for i := 0; i < 200; i++ {
		d := *dev
		d.Tags = map[string]string{"n": fmt.Sprint(i)}
		dir.DeviceChanged(&d)
	}
	wg.Wait()
	if !h.OnACLCheck(cl, "devices/d1/telemetry/t", true) {
		t.Fatal("allowed publish refused")
	}
}
