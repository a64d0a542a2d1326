package acl_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestTokenCertificateDoesNotInheritTPMAttestation (review): a device first
// enrolled with a bootstrap token (software key) and later by TPM
// attestation is "tpm" in the registry. Its token-era certificate, whose
// key never was in a TPM, must not get the rules that require attestation
// tpm: neither on a session opened before the TPM enrollment nor on a new
// connection. (The attestation method is the device's; the token-era
// certificate stayed valid until it expired.)
func TestTokenCertificateDoesNotInheritTPMAttestation(t *testing.T) {
	swtpm.SkipIfNotInstalled(t)
	ctx := context.Background()
	m := swtpm.ManufacturerForTest(t)
	roots := t.TempDir()
	if err := os.WriteFile(filepath.Join(roots, "mfr.pem"), m.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testenv.Config(t, testenv.Options{TPMRootsDir: roots})
	cfg.PolicyFile = filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(cfg.PolicyFile, []byte(tpmOnlyPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	g := testenv.StartConfig(t, cfg)

	// Enrolled with a token: a software key on the device's flash.
	tokDev := g.EnrollDevice(t, "mix-1", "lab")
	connect := func(d *devicesdk.Device) (*devicesdk.Client, error) {
		c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: true})
		if err == nil {
			t.Cleanup(c.Close)
		}
		return c, err
	}
	early, err := connect(tokDev)
	if err != nil {
		t.Fatalf("token connect: %v", err)
	}
	if err := early.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err == nil {
		t.Fatal("token device subscribed to fleet/ota/# before any TPM enrollment")
	}

	// The operator moves the device to its TPM: EK registered, enrolled by
	// attestation.
	_, tpm := swtpm.DeviceForTest(t, m)
	keys, err := tpm.LoadOrCreateKeys(filepath.Join(t.TempDir(), "tpm-state"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.RegisterEK(ctx, api.EKRegisterRequest{EKCert: keys.EK().CertDER, DeviceID: "mix-1", Group: "lab"}); err != nil {
		t.Fatal(err)
	}
	tpmDev, err := devicesdk.New(devicesdk.Config{DeviceID: "mix-1", Key: keys.Signer(), StateDir: filepath.Join(t.TempDir(), "tpm-dev"), EnrollURL: g.URL(), RootCAs: g.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	if err := tpmDev.EnrollTPM(ctx, keys); err != nil {
		t.Fatalf("EnrollTPM: %v", err)
	}
	if d, err := g.Admin.Device(ctx, "mix-1"); err != nil || d.AttestationMethod != "tpm" {
		t.Fatalf("mix-1: %+v %v", d, err)
	}

	// The session opened with the token certificate before the switch.
	if err := early.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err == nil {
		t.Error("the token certificate's session got the tpm-only subscription after the device's TPM enrollment")
	}
	// A new connection with the token certificate (a copy of the software key).
	if late, err := connect(tokDev); err == nil {
		if err := late.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err == nil {
			t.Error("a new connection with the token certificate got the tpm-only subscription")
		}
	}
	// The TPM certificate has it.
	tc, err := connect(tpmDev)
	if err != nil {
		t.Fatalf("TPM connect: %v", err)
	}
	if err := tc.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err != nil {
		t.Fatalf("TPM device refused fleet/ota/#: %v", err)
	}
}
