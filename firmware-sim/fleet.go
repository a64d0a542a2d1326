package sim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	adminclient "github.com/fleetgate/fleetgate/operator/client"
)

// TPM modes.
const (
	TPMNone  = "none"  // software keys, bootstrap-token enrollment
	TPMSwtpm = "swtpm" // one swtpm per device, TPM attestation

	ManufactureECC        = "ecc"         // swtpm.ProvisionECC
	ManufactureSwtpmSetup = "swtpm_setup" // swtpm.ProvisionSwtpmSetup
)

// fleet holds the simulated hardware: one swtpm per device in TPM mode. It
// stops every swtpm it started, by PID, in Close, whatever happened before.
type fleet struct {
	cfg   Config
	admin *adminclient.Client
	mfr   *swtpm.Manufacturer

	mu    sync.Mutex
	tpms  []*swtpm.Instance
	opens []*tpmkey.TPM
}

// device IDs are prefix-NNN.
func (f *fleet) id(i int) string { return fmt.Sprintf("%s-%03d", f.cfg.Prefix, i+1) }

// Close stops every swtpm this fleet started.
func (f *fleet) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, t := range f.opens {
		_ = t.Close()
	}
	var errs []error
	for _, in := range f.tpms {
		if err := in.Stop(); err != nil && !errors.Is(err, swtpm.ErrExited) {
			errs = append(errs, fmt.Errorf("stop swtpm pid %d: %w", in.PID(), err))
		}
	}
	f.tpms, f.opens = nil, nil
	return errors.Join(errs...)
}

// SwtpmPIDs lists the swtpm processes running for this fleet.
func (f *fleet) SwtpmPIDs() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]int, 0, len(f.tpms))
	for _, in := range f.tpms {
		out = append(out, in.PID())
	}
	return out
}

type tpmDevice struct {
	id   string
	dir  string
	tpm  *tpmkey.TPM
	keys *tpmkey.Keys
}

// manufacture starts n swtpms (a few at a time: manufacturing is CPU-bound)
// and registers their EKs as a factory would, in one bulk import.
func (f *fleet) manufacture(ctx context.Context, n int, progress func(string, ...any)) ([]*tpmDevice, error) {
	var err error
	if f.mfr, err = swtpm.NewManufacturer(filepath.Join(f.cfg.WorkDir, "manufacturer")); err != nil {
		return nil, fmt.Errorf("simulated TPM manufacturer: %w", err)
	}
	devs := make([]*tpmDevice, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				errs[i] = ctx.Err()
				return
			}
			defer func() { <-sem }()
			d := &tpmDevice{id: f.id(i), dir: filepath.Join(f.cfg.WorkDir, f.id(i))}
			prov := swtpm.ProvisionECC
			if f.cfg.Manufacture == ManufactureSwtpmSetup {
				prov = swtpm.ProvisionSwtpmSetup
			}
			in, err := swtpm.Start(ctx, swtpm.Options{Dir: filepath.Join(d.dir, "tpm"), Manufacturer: f.mfr, Provisioning: prov})
			if err != nil {
				errs[i] = fmt.Errorf("%s: swtpm: %w", d.id, err)
				return
			}
			f.mu.Lock()
			f.tpms = append(f.tpms, in)
			f.mu.Unlock()
			if d.tpm, err = tpmkey.Open(in.SocketPath()); err != nil {
				errs[i] = fmt.Errorf("%s: open TPM: %w", d.id, err)
				return
			}
			f.mu.Lock()
			f.opens = append(f.opens, d.tpm)
			f.mu.Unlock()
			devs[i] = d
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	progress("%d swtpm devices manufactured (own state, own EK certificate from a simulated manufacturer CA)", n)

	if f.cfg.SkipRegistration {
		progress("EKs NOT registered (--register=false): enrollment must be refused")
		return devs, nil
	}
	entries := make([]api.EKRegisterRequest, 0, n)
	for i, d := range devs {
		ek, err := d.tpm.EK()
		if err != nil {
			return nil, fmt.Errorf("%s: EK: %w", d.id, err)
		}
		entries = append(entries, api.EKRegisterRequest{EKCert: ek.CertDER, DeviceID: d.id, Group: f.cfg.Group, Line: i + 1})
	}
	for start := 0; start < len(entries); start += 1000 { // one transaction per thousand
		end := min(start+1000, len(entries))
		if _, err := f.admin.ImportEKs(ctx, api.EKImportRequest{Entries: entries[start:end]}); err != nil {
			return nil, fmt.Errorf("register EKs (bulk import): %w", err)
		}
	}
	progress("%d EKs registered by bulk import, as at the factory", n)
	return devs, nil
}

// enrollTPM creates the device's AK and TLS key in its TPM and enrolls
// through attestation.
func (f *fleet) enrollTPM(ctx context.Context, d *tpmDevice) (*devicesdk.Device, error) {
	keys, err := d.tpm.LoadOrCreateKeys(filepath.Join(d.dir, "keys"))
	if err != nil {
		return nil, fmt.Errorf("%s: TPM keys: %w", d.id, err)
	}
	d.keys = keys
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: d.id, Key: keys.Signer(), StateDir: filepath.Join(d.dir, "state"),
		EnrollURL: f.cfg.ServerURL, RootCAs: f.cfg.roots})
	if err != nil {
		return nil, err
	}
	if err := dev.EnrollTPM(ctx, keys); err != nil {
		return nil, fmt.Errorf("%s: TPM enrollment: %w", d.id, err)
	}
	return dev, nil
}

// enrollToken enrolls a software-key device with a bootstrap token.
func (f *fleet) enrollToken(ctx context.Context, id string) (*devicesdk.Device, error) {
	tok, err := f.admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: id, Group: f.cfg.Group, TTL: time.Hour})
	if err != nil {
		return nil, fmt.Errorf("%s: token: %w", id, err)
	}
	dir := filepath.Join(f.cfg.WorkDir, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		return nil, err
	}
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: f.cfg.ServerURL, RootCAs: f.cfg.roots})
	if err != nil {
		return nil, err
	}
	if err := dev.EnrollWithToken(ctx, tok.Token); err != nil {
		return nil, fmt.Errorf("%s: enroll: %w", id, err)
	}
	return dev, nil
}
