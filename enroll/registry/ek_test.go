package registry

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

func openTest(t *testing.T) *Registry {
	t.Helper()
	r, err := open(t, t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func fp(i int) string { return fmt.Sprintf("%064x", i) }

// setState writes a device state directly, as revocation (built elsewhere)
// will.
func setState(t *testing.T, r *Registry, id string, st fleet.DeviceState) {
	t.Helper()
	err := r.update(func(txn txn) error {
		var d fleet.Device
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		d.State = st
		return put(txn, pfxDevice+id, &d)
	})
	if err != nil {
		t.Fatal(err)
	}
}

var serialN int

func signer(t *testing.T, called *bool) func(fleet.Device) (*fleet.Certificate, error) {
	return func(d fleet.Device) (*fleet.Certificate, error) {
		*called = true
		serialN++
		now := time.Now()
		return &fleet.Certificate{Serial: fmt.Sprintf("%x", serialN), Role: identity.RoleDevice, Name: d.ID, NotBefore: now, NotAfter: now.Add(time.Hour)}, nil
	}
}

func TestRegisterEK(t *testing.T) {
	r := openTest(t)
	if err := r.RegisterEK(EKRegistration{Fingerprint: fp(1), DeviceID: "dev-1", Group: "lab"}, "op"); err != nil {
		t.Fatal(err)
	}
	d, err := r.Device("dev-1")
	if err != nil {
		t.Fatal(err)
	}
	if d.State != fleet.StateRegistered || d.EKFingerprint != fp(1) || d.Group != "lab" {
		t.Fatalf("device %+v", d)
	}
	if st, ok := r.DeviceStatus("dev-1"); !ok || st.State != fleet.StateRegistered {
		t.Fatalf("index %+v %v", st, ok)
	}
	if err := r.RegisterEK(EKRegistration{Fingerprint: fp(9), DeviceID: "dev-9"}, "op"); err != nil {
		t.Fatal(err)
	}
	setState(t, r, "dev-9", fleet.StateRevoked)
	for _, tc := range []struct {
		name string
		reg  EKRegistration
		want error
	}{
		{"registering the same EK for the same device again updates it", EKRegistration{Fingerprint: fp(1), DeviceID: "dev-1", Group: "lab2"}, nil},
		{"an EK registered to another device is refused", EKRegistration{Fingerprint: fp(1), DeviceID: "dev-2"}, ErrEKRegistered},
		{"a device bound to another EK is refused", EKRegistration{Fingerprint: fp(2), DeviceID: "dev-1"}, ErrDeviceHasEK},
		{"a revoked device cannot be registered again", EKRegistration{Fingerprint: fp(9), DeviceID: "dev-9"}, ErrDeviceRevoked},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := r.RegisterEK(tc.reg, "op"); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	rec, dev, err := r.DeviceByEK(fp(1))
	if err != nil || rec.DeviceID != "dev-1" || dev.Group != "lab2" {
		t.Fatalf("DeviceByEK: %+v %+v %v", rec, dev, err)
	}
	if _, _, err := r.DeviceByEK(fp(3)); !errors.Is(err, ErrEKNotRegistered) {
		t.Fatalf("unknown EK: %v", err)
	}
}

func TestImportEKsIsAllOrNothing(t *testing.T) {
	r := openTest(t)
	if err := r.RegisterEK(EKRegistration{Fingerprint: fp(100), DeviceID: "taken"}, "op"); err != nil {
		t.Fatal(err)
	}
	bad := []EKRegistration{
		{Fingerprint: fp(1), DeviceID: "a"},
		{Fingerprint: fp(100), DeviceID: "b"}, // EK of "taken"
		{Fingerprint: fp(3), DeviceID: "c"},
		{Fingerprint: fp(3), DeviceID: "d"}, // duplicate EK
		{Fingerprint: fp(5), DeviceID: "a"}, // duplicate device
		{Fingerprint: fp(6), DeviceID: "taken"},
	}
	err := r.ImportEKs(bad, "op")
	var ie *ImportError
	if !errors.As(err, &ie) {
		t.Fatalf("err = %v, want *ImportError", err)
	}
	got := map[int]error{}
	for _, p := range ie.Problems {
		got[p.Index] = p.Err
	}
	want := map[int]error{1: ErrEKRegistered, 3: ErrDuplicateInImport, 4: ErrDuplicateInImport, 5: ErrDeviceHasEK}
	if len(got) != len(want) {
		t.Fatalf("problems %v, want indices %v", ie.Problems, want)
	}
	for i, w := range want {
		if !errors.Is(got[i], w) {
			t.Errorf("entry %d: %v, want %v", i, got[i], w)
		}
	}
	if !errors.Is(err, ErrEKRegistered) {
		t.Error("errors.Is does not see through ImportError")
	}
	for _, id := range []string{"a", "c"} {
		if _, err := r.Device(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("device %s written by a refused import: %v", id, err)
		}
	}

	good := []EKRegistration{{Fingerprint: fp(1), DeviceID: "a", Group: "g"}, {Fingerprint: fp(3), DeviceID: "c", Group: "g"}}
	if err := r.ImportEKs(good, "op"); err != nil {
		t.Fatal(err)
	}
	for _, g := range good {
		if rec, _, err := r.DeviceByEK(g.Fingerprint); err != nil || rec.DeviceID != g.DeviceID {
			t.Errorf("%s: %+v %v", g.DeviceID, rec, err)
		}
	}
}

func TestImportEKsTooLargeForOneTransaction(t *testing.T) {
	if testing.Short() {
		t.Skip("large import")
	}
	r := openTest(t)
	regs := make([]EKRegistration, 20000)
	for i := range regs {
		regs[i] = EKRegistration{Fingerprint: fp(i), DeviceID: fmt.Sprintf("d-%d", i), Group: "g"}
	}
	if err := r.ImportEKs(regs, "op"); !errors.Is(err, ErrImportTooLarge) {
		t.Fatalf("err = %v, want ErrImportTooLarge", err)
	}
	if _, err := r.Device("d-0"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a too large import wrote: %v", err)
	}
}

func TestRedeemTPM(t *testing.T) {
	r := openTest(t)
	reg := func(n int, id string) {
		if err := r.RegisterEK(EKRegistration{Fingerprint: fp(n), DeviceID: id, Group: "lab"}, "op"); err != nil {
			t.Fatal(err)
		}
	}
	reg(1, "ok-1")
	reg(2, "revoked-2")
	reg(3, "suspended-3")
	reg(4, "again-4")
	setState(t, r, "revoked-2", fleet.StateRevoked)
	setState(t, r, "suspended-3", fleet.StateSuspended)
	var called bool
	if _, err := r.RedeemTPM(TPMRedemption{EKFingerprint: fp(4), DeviceID: "again-4"}, signer(t, &called)); err != nil {
		t.Fatal(err)
	}
	first, _ := r.Device("again-4")

	for _, tc := range []struct {
		name string
		red  TPMRedemption
		want error
	}{
		{"a registered device is issued a certificate", TPMRedemption{EKFingerprint: fp(1), DeviceID: "ok-1"}, nil},
		{"an unregistered EK is refused", TPMRedemption{EKFingerprint: fp(50), DeviceID: "x"}, ErrEKNotRegistered},
		{"an unregistered EK is registered under the manufacturer policy", TPMRedemption{EKFingerprint: fp(51), DeviceID: "tpm-51", AutoRegister: true, Group: "default"}, nil},
		{"a revoked device is refused and nothing is signed", TPMRedemption{EKFingerprint: fp(2), DeviceID: "revoked-2"}, ErrDeviceRevoked},
		{"a suspended device is refused and nothing is signed", TPMRedemption{EKFingerprint: fp(3), DeviceID: "suspended-3"}, ErrDeviceSuspended},
		{"an EK registered for another device is refused", TPMRedemption{EKFingerprint: fp(1), DeviceID: "again-4"}, ErrEKDeviceMismatch},
		{"a device enrolls again with its registered EK", TPMRedemption{EKFingerprint: fp(4), DeviceID: "again-4"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called = false
			c, err := r.RedeemTPM(tc.red, signer(t, &called))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if tc.want != nil {
				if called {
					t.Error("sign was called for a refused redemption")
				}
				return
			}
			d, err := r.Device(tc.red.DeviceID)
			if err != nil {
				t.Fatal(err)
			}
			if d.State != fleet.StateActive || d.AttestationMethod != fleet.MethodTPM || d.CurrentSerial != c.Serial || d.EKFingerprint != tc.red.EKFingerprint {
				t.Errorf("device after redemption: %+v", d)
			}
			if st, ok := r.CertStatus(c.Serial); !ok || st.Revoked || st.Identity.Name != tc.red.DeviceID {
				t.Errorf("cert index: %+v %v", st, ok)
			}
		})
	}
	// Re-enrollment keeps the earlier certificate valid.
	again, _ := r.Device("again-4")
	if again.CurrentSerial == first.CurrentSerial {
		t.Fatal("re-enrollment did not record a new certificate")
	}
	if st, ok := r.CertStatus(first.CurrentSerial); !ok || st.Revoked {
		t.Errorf("earlier certificate after re-enrollment: %+v %v", st, ok)
	}
}
