package replica

import (
	"errors"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/fleet"
)

func TestApplyFollowsTheFeed(t *testing.T) {
	r := New("https://unused", nil, nil)
	var evs []fleet.Event
	r.Directory().Watch(func(ev fleet.Event) { evs = append(evs, ev) })
	if r.Fresh() {
		t.Fatal("fresh before any snapshot")
	}
	exp := time.Now().Add(time.Hour)
	if err := r.Apply(api.Feed{Epoch: "e1", Version: 3, Snapshot: true,
		Certs:   []api.FeedCert{{Serial: "a1", Role: "device", Name: "d1", NotAfter: exp}, {Serial: "b2", Role: "service", Name: "svc", NotAfter: exp}},
		Devices: []api.FeedDevice{{ID: "d1", Group: "g", State: "active"}}}); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.Directory().CertStatus("a1"); !ok {
		t.Fatal("snapshot not applied")
	}
	if role, ok := r.Directory().PrincipalRole("svc"); !ok || role != "service" {
		t.Fatalf("service name not known: %v %v", role, ok)
	}
	evs = nil
	// A revocation in a change set is told to the watchers.
	if err := r.Apply(api.Feed{Epoch: "e1", Version: 4, Certs: []api.FeedCert{{Serial: "a1", Role: "device", Name: "d1", NotAfter: exp, Revoked: true}},
		Devices: []api.FeedDevice{{ID: "d1", Group: "g", State: "revoked"}}}); err != nil {
		t.Fatal(err)
	}
	if len(evs) != 2 {
		t.Fatalf("events %+v, want a certificate revocation and a device change", evs)
	}
	// A stale answer cannot un-revoke.
	if err := r.Apply(api.Feed{Epoch: "e1", Version: 5, Certs: []api.FeedCert{{Serial: "a1", Role: "device", Name: "d1", NotAfter: exp}},
		Devices: []api.FeedDevice{{ID: "d1", Group: "g", State: "active"}}}); err != nil {
		t.Fatal(err)
	}
	if cs, _ := r.Directory().CertStatus("a1"); !cs.Revoked {
		t.Error("certificate un-revoked by a stale answer")
	}
	if ds, _ := r.Directory().DeviceStatus("d1"); ds.State != fleet.StateRevoked {
		t.Error("device un-revoked by a stale answer")
	}
	// A new snapshot without a certificate forgets it and closes its sessions.
	evs = nil
	if err := r.Apply(api.Feed{Epoch: "e2", Version: 1, Snapshot: true, Certs: []api.FeedCert{{Serial: "a1", Role: "device", Name: "d1", NotAfter: exp, Revoked: true}}}); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.Directory().CertStatus("b2"); ok {
		t.Error("certificate missing from the snapshot still known")
	}
	found := false
	for _, ev := range evs {
		found = found || (ev.Kind == fleet.EventCertRevoked && ev.Serial == "b2")
	}
	if !found {
		t.Errorf("no revocation event for the forgotten certificate: %+v", evs)
	}
	// A malformed identity is refused.
	if err := r.Apply(api.Feed{Epoch: "e2", Version: 2, Certs: []api.FeedCert{{Serial: "x", Role: "root", Name: "../x"}}}); !errors.Is(err, ErrBadFeed) {
		t.Fatalf("malformed feed: %v", err)
	}
}
