package swtpm_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// A TPM made by ProvisionECC holds one EK certificate, at the P-256 index,
// for the EK its own seed gives (tpmkey recreates the EK from the template
// and compares), signed by the manufacturer; the index is write-locked; a
// restart keeps it; two TPMs have two different EKs.
func TestProvisionECC(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	dir := t.TempDir()
	inst := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir, Manufacturer: m, Provisioning: swtpm.ProvisionECC})
	ek := onlyEK(t, inst, m)
	if _, err := os.Stat(filepath.Join(dir, "state.provisioning")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the provisioning marker is left: %v", err)
	}

	tr, err := linuxudstpm.Open(inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: ek.NVIndex}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.TPMRHPlatform,
		NVIndex:    tpm2.NamedHandle{Handle: ek.NVIndex, Name: rp.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: []byte("forged")},
	}.Execute(tr)
	tr.Close()
	if !errors.Is(err, tpm2.TPMRCNVLocked) {
		t.Fatalf("writing the EK certificate index after manufacture: %v, want TPM_RC_NV_LOCKED", err)
	}

	if err := inst.Stop(); err != nil {
		t.Fatal(err)
	}
	again := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir})
	if got := onlyEK(t, again, m); string(got.CertDER) != string(ek.CertDER) {
		t.Error("the EK certificate changed across a restart")
	}
	other := onlyEK(t, swtpm.StartForTestOptions(t, swtpm.Options{Dir: t.TempDir(), Manufacturer: m, Provisioning: swtpm.ProvisionECC}), m)
	if other.Cert.PublicKey.(*ecdsa.PublicKey).Equal(ek.Cert.PublicKey) {
		t.Error("two TPMs have the same EK")
	}
}

// A directory left half-made by a crash during provisioning is not taken
// for a TPM: the next Start provisions afresh.
func TestProvisionECCAfterACrash(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	dir := t.TempDir()
	first := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir, Manufacturer: m, Provisioning: swtpm.ProvisionECC})
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}
	// As if the process had died before the certificate was written: the
	// state exists, the marker too.
	if err := os.WriteFile(filepath.Join(dir, "state.provisioning"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := swtpm.Start(t.Context(), swtpm.Options{Dir: dir}); !errors.Is(err, swtpm.ErrInvalidOptions) {
		t.Fatalf("a half-made TPM started without a manufacturer: %v", err)
	}
	onlyEK(t, swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir, Manufacturer: m, Provisioning: swtpm.ProvisionECC}), m)
	if _, err := os.Stat(filepath.Join(dir, "state.provisioning")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the provisioning marker is left: %v", err)
	}
}

func onlyEK(t *testing.T, inst *swtpm.Instance, m *swtpm.Manufacturer) *tpmkey.EK {
	t.Helper()
	tpm := swtpm.OpenForTest(t, inst)
	eks, err := tpm.EKs()
	if err != nil {
		t.Fatalf("EKs: %v", err)
	}
	if len(eks) != 1 || eks[0].NVIndex != tpmkey.NVIndexECCP256EKCert {
		t.Fatalf("%d EK certificates, want one at the P-256 index", len(eks))
	}
	ek := eks[0]
	if k, ok := ek.Cert.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Fatalf("EK key %T, want P-256", ek.Cert.PublicKey)
	}
	if _, err := attest.VerifyEKCertificate(ek.CertDER, m.RootPool(), time.Now()); err != nil {
		t.Fatalf("EK certificate does not verify against the manufacturer: %v", err)
	}
	return ek
}

// BenchmarkManufacture: one TPM made from nothing to answering, by each
// way (ns/op is wall time per TPM, one at a time).
func BenchmarkManufacture(b *testing.B) {
	m := swtpm.ManufacturerForTest(b)
	for _, p := range []swtpm.Provisioning{swtpm.ProvisionSwtpmSetup, swtpm.ProvisionECC} {
		b.Run(fmt.Sprint(p), func(b *testing.B) {
			for range b.N {
				inst := swtpm.StartForTestOptions(b, swtpm.Options{Dir: b.TempDir(), Manufacturer: m, Provisioning: p})
				if err := inst.Stop(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
