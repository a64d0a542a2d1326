package acl_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// The deployment's policy: only TPM-attested devices may take firmware
// from fleet/ota/# and report on devices/{id}/firmware/#.
const tpmOnlyPolicy = `rules:
  - name: ota-tpm-only
    roles: [device]
    attestation: [tpm]
    allow: [subscribe]
    topics: ["fleet/ota/#"]
  - name: firmware-report-tpm-only
    roles: [device]
    attestation: [tpm]
    allow: [publish]
    topics: ["devices/{id}/firmware/#"]
  - name: service-read
    roles: [service]
    allow: [subscribe]
    topics: ["devices/#"]
`

// TestAttestationPolicyOnRealBroker: on a running server with a policy
// that requires attestation tpm, a device enrolled with a swtpm may
// subscribe to fleet/ota/# and publish its firmware report; a device
// enrolled with a token is refused both on the same topics (SUBACK 0x80; a
// QoS 1 publish refused, counted and logged).
func TestAttestationPolicyOnRealBroker(t *testing.T) {
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

	// The TPM device: its EK registered at manufacturing, enrolled by
	// attestation; its TLS key never leaves the swtpm.
	_, tpm := swtpm.DeviceForTest(t, m)
	keys, err := tpm.LoadOrCreateKeys(filepath.Join(t.TempDir(), "tpm-state"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.RegisterEK(ctx, api.EKRegisterRequest{EKCert: keys.EK().CertDER, DeviceID: "tpm-1", Group: "lab"}); err != nil {
		t.Fatal(err)
	}
	tpmDev, err := devicesdk.New(devicesdk.Config{DeviceID: "tpm-1", Key: keys.Signer(), StateDir: filepath.Join(t.TempDir(), "tpm-dev"), EnrollURL: g.URL(), RootCAs: g.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	if err := tpmDev.EnrollTPM(ctx, keys); err != nil {
		t.Fatalf("EnrollTPM: %v", err)
	}
	tokDev := g.EnrollDevice(t, "tok-1", "lab")
	for id, want := range map[string]string{"tpm-1": "tpm", "tok-1": "token"} {
		if d, err := g.Admin.Device(ctx, id); err != nil || d.AttestationMethod != want {
			t.Fatalf("%s: %+v %v", id, d, err)
		}
	}

	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 8)
	if tok := svc.Subscribe("devices/+/firmware/#", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + "=" + string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("service subscribe: %v", tok.Error())
	}

	connect := func(d *devicesdk.Device) *devicesdk.Client {
		c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: true})
		if err != nil {
			t.Fatalf("connect %s: %v", d.ID(), err)
		}
		t.Cleanup(c.Close)
		return c
	}
	tpmC, tokC := connect(tpmDev), connect(tokDev)

	// Subscribe to the same filter: allowed for one, refused for the other.
	if err := tpmC.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err != nil {
		t.Fatalf("TPM device refused fleet/ota/#: %v", err)
	}
	if err := tokC.Subscribe(ctx, "fleet/ota/#", 1, func(devicesdk.Message) {}); err == nil || !strings.Contains(err.Error(), "0x80") {
		t.Fatalf("token device subscribed to fleet/ota/#: %v", err)
	}

	// Publish the firmware report: the token device's QoS 1 publish is
	// refused (MQTT 3.1.1 has no negative PUBACK: the broker closes the
	// connection) and counted; the TPM device's arrives.
	if err := tokC.Publish(ctx, "devices/tok-1/firmware/report", 1, false, []byte("v1")); err == nil {
		t.Fatal("the token device's firmware report was acknowledged")
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		if m := g.Metrics(t); !strings.Contains(m, `fleetgate_broker_acl_denied_total{direction="publish"} 1`) {
			return fmt.Errorf("publish denial not counted")
		}
		return nil
	})
	if err := tpmC.Publish(ctx, "devices/tpm-1/firmware/report", 1, false, []byte("v2")); err != nil {
		t.Fatalf("TPM publish: %v", err)
	}
	select {
	case m := <-got:
		if m != "devices/tpm-1/firmware/report=v2" {
			t.Fatalf("service got %q first: the token device's report went through", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the TPM device's report was not delivered")
	}
	if !strings.Contains(g.Logs.String(), "acl denied") {
		t.Error("no acl denied log line")
	}
}
