package enroll_test

import (
	"context"
	"fmt"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
)

// Example walks the whole TPM-bound enrollment with a real software TPM: a
// TPM manufacturer, a factory that registers the TPM's endorsement key, an
// enrollment server that trusts the manufacturer, and a device that proves
// its TLS key lives in its TPM and gets a certificate for it. It needs the
// swtpm binaries (make deps).
func Example() {
	ctx := context.Background()
	tmp, err := os.MkdirTemp("", "fleetgate-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(tmp)

	// A TPM manufacturer's CA, and a TPM it made, with its EK certificate.
	mfr, err := swtpm.NewManufacturer(filepath.Join(tmp, "manufacturer"))
	if err != nil {
		log.Fatal(err)
	}
	inst, err := swtpm.Start(ctx, swtpm.Options{Dir: filepath.Join(tmp, "tpm"), Manufacturer: mfr})
	if err != nil {
		log.Fatal(err)
	}
	defer inst.Stop()

	// The enrollment server: a CA, a registry, the manufacturer's root.
	res, err := ca.Init(filepath.Join(tmp, "data"), ca.InitOptions{TrustDomain: "example.fleetgate", Hosts: []string{"localhost"}})
	if err != nil {
		log.Fatal(err)
	}
	reg, err := registry.Open(filepath.Join(tmp, "data", "registry"), registry.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Close()
	srv, err := enroll.New(enroll.Config{CA: res.Authority, Registry: reg, TPMRoots: mfr.RootPool(), TPMPolicy: enroll.TPMPolicyAllowlist})
	if err != nil {
		log.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()

	// The device: its TPM, an AK and a TLS key created inside it.
	tpm, err := tpmkey.Open(inst.SocketPath())
	if err != nil {
		log.Fatal(err)
	}
	defer tpm.Close()
	state := filepath.Join(tmp, "device")
	keys, err := tpm.LoadOrCreateKeys(state)
	if err != nil {
		log.Fatal(err)
	}

	// At the factory: register the EK under the device's ID and group
	// (`fleetgate devices register --ek-cert FILE --device sensor-1 --group greenhouse`).
	ek := keys.EK().Cert
	if err := reg.RegisterEK(registry.EKRegistration{Fingerprint: api.EKFingerprint(ek.RawSubjectPublicKeyInfo), DeviceID: "sensor-1", Group: "greenhouse"}, "factory"); err != nil {
		log.Fatal(err)
	}

	// At first boot: enroll (challenge, ActivateCredential, Certify, complete).
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: "sensor-1", Key: keys.Signer(), StateDir: state, EnrollURL: hs.URL})
	if err != nil {
		log.Fatal(err)
	}
	if err := dev.EnrollTPM(ctx, keys); err != nil {
		log.Fatal(err)
	}

	d, err := reg.Device("sensor-1")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("identity:", dev.Leaf().URIs[0])
	fmt.Println("state:", d.State, "attestation:", d.AttestationMethod, "group:", d.Group)
	fmt.Println("certificate is for the TPM key:", keys.TLSPublicKey().Equal(dev.Leaf().PublicKey))
	fmt.Println("recorded serial:", d.CurrentSerial == ca.SerialString(dev.Leaf().SerialNumber))
	// Output:
	// identity: spiffe://example.fleetgate/device/sensor-1
	// state: active attestation: tpm group: greenhouse
	// certificate is for the TPM key: true
	// recorded serial: true
}
