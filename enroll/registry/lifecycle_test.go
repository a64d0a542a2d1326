package registry

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// enrollTestDevice redeems a token for id and records n certificates.
func enrollTestDevice(t *testing.T, r *Registry, id string, n int) []string {
	t.Helper()
	var serials []string
	for range n {
		serialN++
		secret := []byte(fmt.Sprintf("secret-%d", serialN))
		tokID := fmt.Sprintf("%s-tok-%d", id, serialN)
		if err := r.CreateToken(Token{ID: tokID, Hash: HashTokenSecret(secret), DeviceID: id, Group: "g", ExpiresAt: time.Now().Add(time.Hour)}, "test"); err != nil {
			t.Fatal(err)
		}
		serial := fmt.Sprintf("ab%08x", serialN)
		_, err := r.RedeemToken(tokID, secret, id, func(TokenRedemption) (*fleet.Certificate, error) {
			return &fleet.Certificate{Serial: serial, Role: identity.RoleDevice, Name: id, NotAfter: time.Now().Add(48 * time.Hour)}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		serials = append(serials, serial)
	}
	return serials
}

func TestRevokeDeviceRevokesEveryCertificateBeforeWatchersHear(t *testing.T) {
	r := openTest(t)
	serials := enrollTestDevice(t, r, "dev-a", 3)
	var mu sync.Mutex
	var seen []fleet.Event
	r.Watch(func(ev fleet.Event) {
		// Watchers run after the index changed: a broker closing sessions
		// here finds the device already refused.
		if ev.Kind == fleet.EventDeviceChanged {
			if st, _ := r.DeviceStatus(ev.DeviceID); st.State != fleet.StateRevoked {
				t.Errorf("watcher ran before the index changed: %v", st.State)
			}
		}
		mu.Lock()
		seen = append(seen, ev)
		mu.Unlock()
	})
	got, err := r.RevokeDevice("dev-a", "stolen", "op")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("revoked %v, want all 3 certificates", got)
	}
	for _, s := range serials {
		if st, ok := r.CertStatus(s); !ok || !st.Revoked {
			t.Errorf("%s not revoked in the index", s)
		}
	}
	revoked, _ := r.RevokedCertificates(time.Now())
	if len(revoked) != 3 {
		t.Errorf("RevokedCertificates: %d", len(revoked))
	}
	if again, err := r.RevokeDevice("dev-a", "again", "op"); err != nil || len(again) != 0 {
		t.Errorf("second revoke: %v %v", again, err)
	}
	if err := r.SetSuspended("dev-a", false, "", "op"); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("resume of revoked device: %v", err)
	}
	if err := r.CreateToken(Token{ID: "t-x", DeviceID: "dev-a", ExpiresAt: time.Now().Add(time.Hour)}, "op"); !errors.Is(err, ErrDeviceRevoked) {
		t.Errorf("token for revoked device: %v", err)
	}
	if _, err := r.RevokeDevice("nobody", "x", "op"); !errors.Is(err, ErrNotFound) {
		t.Errorf("revoke unknown: %v", err)
	}
}

func TestRevocationSurvivesReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "reg")
	r, err := open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	serials := enrollTestDevice(t, r, "dev-r", 1)
	if _, err := r.RevokeDevice("dev-r", "x", "op"); err != nil {
		t.Fatal(err)
	}
	r.Close()
	r2, err := open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if st, _ := r2.DeviceStatus("dev-r"); st.State != fleet.StateRevoked {
		t.Fatalf("device after reopen: %v", st.State)
	}
	if st, _ := r2.CertStatus(serials[0]); !st.Revoked {
		t.Fatal("certificate not revoked after reopen")
	}
}

func TestTokenRefusedForATPMBoundDevice(t *testing.T) {
	r := openTest(t)
	if err := r.RegisterEK(EKRegistration{Fingerprint: strings.Repeat("ab", 32), DeviceID: "tpm-dev", Group: "g"}, "op"); err != nil {
		t.Fatal(err)
	}
	err := r.CreateToken(Token{ID: "t1", DeviceID: "tpm-dev", ExpiresAt: time.Now().Add(time.Hour)}, "op")
	if !errors.Is(err, ErrTPMBound) {
		t.Fatalf("token for TPM-bound device: %v", err)
	}
}

func TestChangeFeedCatchUpAndSnapshots(t *testing.T) {
	r := openTest(t)
	epoch, v0, _, _ := r.Directory().Snapshot()
	enrollTestDevice(t, r, "dev-f", 1)
	evs, v1, ok, _ := r.Directory().Changes(epoch, v0)
	if !ok || len(evs) == 0 || v1 <= v0 {
		t.Fatalf("changes since %d: %v %d %v", v0, evs, v1, ok)
	}
	if _, _, ok, _ := r.Directory().Changes("other-epoch", v0); ok {
		t.Error("a foreign epoch did not ask for a snapshot")
	}
	if _, _, ok, _ := r.Directory().Changes(epoch, v1+10); ok {
		t.Error("a version from the future did not ask for a snapshot")
	}
	evs, _, ok, wait := r.Directory().Changes(epoch, v1)
	if !ok || len(evs) != 0 {
		t.Fatalf("no changes expected: %v", evs)
	}
	go r.SetSuspended("dev-f", true, "x", "op")
	select {
	case <-wait:
	case <-time.After(5 * time.Second):
		t.Fatal("long poll not woken by a change")
	}
}

func TestAttributesAndExpiryCounts(t *testing.T) {
	r := openTest(t)
	enrollTestDevice(t, r, "dev-t", 1)
	if _, err := r.UpdateAttributes("dev-t", "field", map[string]string{"site": "x"}, "op"); err != nil {
		t.Fatal(err)
	}
	st, _ := r.DeviceStatus("dev-t")
	if st.Group != "field" || st.Tags["site"] != "x" {
		t.Fatalf("status %+v", st)
	}
	if n := r.Directory().CountExpiring(time.Now(), 7*24*time.Hour); n != 1 {
		t.Fatalf("expiring within 7d: %d", n)
	}
	if n := r.Directory().CountExpiring(time.Now(), time.Hour); n != 0 {
		t.Fatalf("expiring within 1h: %d", n)
	}
}

func TestRenewalIsBoundedAndOnlyFromTheCurrentCertificate(t *testing.T) {
	r := openTest(t)
	first := enrollTestDevice(t, r, "renewer", 1)[0]
	cur := first
	renew := func(from string) (string, error) {
		serialN++
		s := fmt.Sprintf("cd%08x", serialN)
		_, err := r.RecordRenewal("renewer", from, func(fleet.Device) (*fleet.Certificate, error) {
			return &fleet.Certificate{Serial: s, Role: identity.RoleDevice, Name: "renewer", NotAfter: time.Now().Add(time.Hour)}, nil
		})
		return s, err
	}
	for i := 1; i < MaxLiveCertificates; i++ {
		s, err := renew(cur)
		if err != nil {
			t.Fatalf("renewal %d: %v", i, err)
		}
		cur = s
	}
	if _, err := renew(cur); !errors.Is(err, ErrRenewalTooSoon) {
		t.Fatalf("renewal past %d live certificates: %v", MaxLiveCertificates, err)
	}
	if _, err := renew(first); !errors.Is(err, ErrRenewalTooSoon) {
		t.Fatalf("renewal from an older certificate: %v", err)
	}
	// Revocation still works, and covers every live certificate.
	got, err := r.RevokeDevice("renewer", "loop", "op")
	if err != nil || len(got) != MaxLiveCertificates {
		t.Fatalf("revoke: %d certificates, %v", len(got), err)
	}
}
