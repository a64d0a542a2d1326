package directory

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// The attestation method of a device reaches a follower's directory, in a
// snapshot and in a change, through the JSON of the feed: a broker in its
// own process applies attestation rules as the one beside the registry.
func TestFeedCarriesTheAttestationMethod(t *testing.T) {
	src := New()
	exp := time.Now().Add(time.Hour)
	src.Issued(&fleet.Certificate{Serial: "a1", Role: identity.RoleDevice, Name: "d1", NotAfter: exp}, &fleet.Device{ID: "d1", State: fleet.StateActive, AttestationMethod: fleet.MethodTPM})
	dst := New()
	apply := func(f api.Feed) {
		t.Helper()
		b, err := json.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		var back api.Feed
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if err := dst.ApplyFeed(back); err != nil {
			t.Fatal(err)
		}
	}
	f, _, _ := src.FeedSince("", 0)
	apply(f)
	if ds, _ := dst.DeviceStatus("d1"); ds.Method != fleet.MethodTPM {
		t.Fatalf("after the snapshot: %+v", ds)
	}
	src.Issued(&fleet.Certificate{Serial: "b2", Role: identity.RoleDevice, Name: "d2", NotAfter: exp}, &fleet.Device{ID: "d2", State: fleet.StateActive, AttestationMethod: fleet.MethodToken})
	f, _, _ = src.FeedSince(f.Epoch, f.Version)
	apply(f)
	if ds, _ := dst.DeviceStatus("d2"); ds.Method != fleet.MethodToken {
		t.Fatalf("after a change: %+v", ds)
	}
}
