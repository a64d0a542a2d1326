package auth

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// boundTestHook is a hook with device d1 (lab) and service svc connected.
func boundTestHook(t *testing.T) (h *Hook, dev, svc *mqtt.Client) {
	t.Helper()
	dir := directory.New()
	p, err := acl.ParseFile("policy.yaml", []byte(cacheTestPolicy))
	if err != nil {
		t.Fatal(err)
	}
	h = New(Options{Directory: dir, Policy: func() *acl.Policy { return p }})
	na := time.Now().Add(time.Hour)
	dir.Issued(&fleet.Certificate{Serial: "01", Role: identity.RoleDevice, Name: "d1", NotAfter: na},
		&fleet.Device{ID: "d1", Group: "lab", State: fleet.StateActive})
	dir.Issued(&fleet.Certificate{Serial: "02", Role: identity.RoleService, Name: "svc", NotAfter: na}, nil)
	dev, svc = &mqtt.Client{ID: "d1"}, &mqtt.Client{ID: "svc"}
	h.sessions.Store("d1", &Session{Identity: identity.Identity{Role: identity.RoleDevice, Name: "d1"}, Serial: "01", NotAfter: na, Client: dev})
	h.sessions.Store("svc", &Session{Identity: identity.Identity{Role: identity.RoleService, Name: "svc"}, Serial: "02", NotAfter: na, Client: svc})
	return h, dev, svc
}

// mochi decodes a packet's topic name in place (packets.bytesToString):
// the string shares the packet's buffer, payload included. A cached
// decision must not keep that buffer (up to the maximum packet size) alive
// for the session's lifetime.
func TestACLCacheDoesNotPinPacketBuffer(t *testing.T) {
	h, dev, _ := boundTestHook(t)
	freed := make(chan struct{})
	func() {
		buf := new([1 << 20]byte) // a packet: topic, then a large payload
		runtime.SetFinalizer(buf, func(*[1 << 20]byte) { close(freed) })
		n := copy(buf[:], "devices/d1/telemetry/t")
		topic := unsafe.String(&buf[0], n)
		if !h.OnACLCheck(dev, topic, true) {
			t.Fatal("publish refused")
		}
	}()
	for i := 0; i < 20; i++ {
		runtime.GC()
		select {
		case <-freed:
			// the decision is still cached, on a copy of the topic
			if !h.OnACLCheck(dev, "devices/d1/telemetry/t", true) {
				t.Fatal("publish refused")
			}
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatal("the ACL cache keeps the packet buffer of a topic alive")
}

// A session's cache holds a bounded number of bytes: a publisher's long,
// distinct topics (up to 65,535 bytes each) are evaluated, not cached.
func TestACLCacheBoundedBytes(t *testing.T) {
	h, _, svc := boundTestHook(t)
	long := strings.Repeat("x", 4<<10)
	for i := 0; i < 2*aclSlotsService; i++ {
		if !h.OnACLCheck(svc, fmt.Sprintf("devices/d%d/telemetry/%s", i, long), false) {
			t.Fatalf("delivery %d refused", i)
		}
	}
	s, _ := h.Lookup("svc")
	held := 0
	if tbl := s.acl.subs.Load(); tbl != nil {
		for i := range *tbl {
			if e := (*tbl)[i].Load(); e != nil {
				held += len(e.topic)
			}
		}
	}
	if max := aclSlotsService * 512; held > max {
		t.Fatalf("one session's ACL cache holds %d bytes of topics (bound %d)", held, max)
	}
}
