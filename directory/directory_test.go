package directory

import (
	"crypto/x509"
	"errors"
	"math/big"
	neturl "net/url"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

const td = "fleet.test"

func leaf(serial int64, id identity.Identity, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{SerialNumber: big.NewInt(serial), NotAfter: notAfter, URIs: []*neturl.URL{id.URI(td)}}
}

func TestVerifyRefusesWhatTheDirectoryDoesNotVouchFor(t *testing.T) {
	now := time.Now()
	exp := now.Add(time.Hour)
	dev := identity.Identity{Role: identity.RoleDevice, Name: "d1"}
	svc := identity.Identity{Role: identity.RoleService, Name: "backend"}
	d := New()
	d.Issued(&fleet.Certificate{Serial: "a1", Role: dev.Role, Name: dev.Name, NotAfter: exp}, &fleet.Device{ID: "d1", State: fleet.StateActive})
	d.Issued(&fleet.Certificate{Serial: "b2", Role: svc.Role, Name: svc.Name, NotAfter: exp}, nil)
	d.Issued(&fleet.Certificate{Serial: "c3", Role: dev.Role, Name: "d2", NotAfter: exp}, nil)

	for _, tc := range []struct {
		name   string
		leaf   *x509.Certificate
		reason fleet.Reason
		err    error
	}{
		{"device ok", leaf(0xa1, dev, exp), "", nil},
		{"service ok", leaf(0xb2, svc, exp), "", nil},
		{"no certificate", nil, fleet.ReasonNoCert, ErrNoCert},
		{"no identity", &x509.Certificate{SerialNumber: big.NewInt(0xa1), NotAfter: exp}, fleet.ReasonNoIdentity, identity.ErrNoIdentity},
		{"never issued", leaf(0xff, dev, exp), fleet.ReasonUnknownSerial, ErrUnknownSerial},
		{"other identity", leaf(0xa1, svc, exp), fleet.ReasonIdentityDiffer, ErrIdentityDiffer},
		{"expired", leaf(0xa1, dev, now), fleet.ReasonExpired, ErrExpired},
		{"device unknown", leaf(0xc3, identity.Identity{Role: identity.RoleDevice, Name: "d2"}, exp), fleet.ReasonUnknownDevice, ErrUnknownDevice},
	} {
		id, reason, err := d.Verify(tc.leaf, td, now)
		if reason != tc.reason || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("%s: reason %q err %v, want %q %v", tc.name, reason, err, tc.reason, tc.err)
		}
		if err == nil && tc.leaf != nil && id.Name == "" {
			t.Errorf("%s: no identity", tc.name)
		}
	}

	d.DeviceChanged(&fleet.Device{ID: "d1", State: fleet.StateSuspended})
	if _, reason, _ := d.Verify(leaf(0xa1, dev, exp), td, now); reason != fleet.ReasonSuspended {
		t.Errorf("suspended device: %q", reason)
	}
	d.DeviceChanged(&fleet.Device{ID: "d1", State: fleet.StateActive})
	d.Revoked("d1", "a1")
	if _, reason, _ := d.Verify(leaf(0xa1, dev, exp), td, now); reason != fleet.ReasonRevoked {
		t.Errorf("revoked certificate: %q", reason)
	}
	d.Issued(&fleet.Certificate{Serial: "a4", Role: dev.Role, Name: dev.Name, NotAfter: exp}, &fleet.Device{ID: "d1", State: fleet.StateRevoked})
	if _, reason, _ := d.Verify(leaf(0xa4, dev, exp), td, now); reason != fleet.ReasonRevoked {
		t.Errorf("revoked device: %q", reason)
	}
}

// The feed carries a directory to a follower: a snapshot first, then the
// changes after the follower's version, and the follower ends up with the
// same view, its watchers told of revocations.
func TestFeedRoundTrip(t *testing.T) {
	exp := time.Now().Add(time.Hour).Truncate(time.Second)
	src, dst := New(), New()
	src.Issued(&fleet.Certificate{Serial: "a1", Role: identity.RoleDevice, Name: "d1", NotAfter: exp}, &fleet.Device{ID: "d1", Group: "g", State: fleet.StateActive})
	src.Issued(&fleet.Certificate{Serial: "b2", Role: identity.RoleService, Name: "svc", NotAfter: exp}, nil)
	var heard []fleet.Event
	dst.Watch(func(ev fleet.Event) { heard = append(heard, ev) })

	f, ready, _ := src.FeedSince("", 0)
	if !ready || !f.Snapshot {
		t.Fatalf("first answer: ready %v snapshot %v", ready, f.Snapshot)
	}
	if err := dst.ApplyFeed(f); err != nil {
		t.Fatal(err)
	}
	if role, ok := dst.PrincipalRole("svc"); !ok || role != identity.RoleService {
		t.Fatalf("principal not carried: %v %v", role, ok)
	}
	epoch, version := f.Epoch, f.Version
	if f, ready, wait := src.FeedSince(epoch, version); ready || len(f.Certs) != 0 || wait == nil {
		t.Fatalf("no change expected: %+v %v", f, ready)
	}

	src.DeviceChanged(&fleet.Device{ID: "d1", Group: "g", State: fleet.StateRevoked})
	src.Revoked("d1", "a1")
	heard = nil
	f, ready, _ = src.FeedSince(epoch, version)
	if !ready || f.Snapshot || len(f.Certs) != 1 || len(f.Devices) != 1 {
		t.Fatalf("changes: %+v", f)
	}
	if err := dst.ApplyFeed(f); err != nil {
		t.Fatal(err)
	}
	if cs, _ := dst.CertStatus("a1"); !cs.Revoked {
		t.Error("revocation not carried")
	}
	if len(heard) != 2 {
		t.Errorf("follower's watchers heard %+v, want a revocation and a device change", heard)
	}
	_, _, wantC, wantD := src.Snapshot()
	_, _, gotC, gotD := dst.Snapshot()
	if len(gotC) != len(wantC) || len(gotD) != len(wantD) {
		t.Fatalf("follower %v %v, source %v %v", gotC, gotD, wantC, wantD)
	}
	for s, c := range wantC {
		if gotC[s] != c {
			t.Errorf("cert %s: %+v, want %+v", s, gotC[s], c)
		}
	}
	if gotD["d1"].State != fleet.StateRevoked {
		t.Errorf("device %+v", gotD["d1"])
	}

	// A stale answer cannot un-revoke; a malformed one changes nothing.
	if err := dst.ApplyFeed(api.Feed{Epoch: epoch, Certs: []api.FeedCert{{Serial: "a1", Role: "device", Name: "d1", NotAfter: exp}},
		Devices: []api.FeedDevice{{ID: "d1", State: "active"}}}); err != nil {
		t.Fatal(err)
	}
	if cs, _ := dst.CertStatus("a1"); !cs.Revoked {
		t.Error("stale answer un-revoked the certificate")
	}
	if ds, _ := dst.DeviceStatus("d1"); ds.State != fleet.StateRevoked {
		t.Error("stale answer un-revoked the device")
	}
	if err := dst.ApplyFeed(api.Feed{Snapshot: true, Certs: []api.FeedCert{{Serial: "x", Role: "root", Name: "../x"}}}); !errors.Is(err, ErrBadFeed) {
		t.Fatalf("malformed feed: %v", err)
	}
	if _, ok := dst.CertStatus("b2"); !ok {
		t.Error("a refused snapshot forgot certificates")
	}
}
