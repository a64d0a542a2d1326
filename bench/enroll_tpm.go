package bench

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
)

// Scenario 7, TPM path: enrollment through TPM attestation.

// PrepareTPM creates (or reuses) a simulated TPM manufacturer and has
// fleetgate trust its root (--tpm-roots). It reports false when swtpm is
// not installed.
func (e *Env) PrepareTPM() (bool, error) {
	if err := swtpm.Installed(); err != nil {
		e.Logf("TPM enrollment skipped: %v", err)
		return false, nil
	}
	dir := filepath.Join(e.Work, "tpm", "manufacturer")
	m, err := swtpm.LoadManufacturer(dir)
	if err != nil {
		if m, err = swtpm.NewManufacturer(dir); err != nil {
			return false, err
		}
	}
	roots := filepath.Join(e.Work, "tpm", "roots")
	if err := os.MkdirAll(roots, 0o700); err != nil {
		return false, err
	}
	if err := os.WriteFile(filepath.Join(roots, "manufacturer.pem"), m.RootPEM(), 0o644); err != nil {
		return false, err
	}
	e.tpmMfr = m
	e.ExtraServeFlags = append(e.ExtraServeFlags, "--tpm-roots", roots)
	return true, nil
}

// EnrollTPMScenario runs cfg.TPMDevices swtpm devices (EKs registered as at
// the factory), each enrolling through TPM attestation cfg.TPMRounds times
// in a row, all devices at once. The swtpm processes and this process
// (device side) are not the fleetgate process: its CPU time is the
// server-side cost alone.
func (e *Env) EnrollTPMScenario(ctx context.Context, res *Results, cfg Config, brokers map[string]*Broker) error {
	if e.tpmMfr == nil {
		return nil
	}
	fg := brokers["fleetgate"]
	admin, err := e.Admin(fg)
	if err != nil {
		return err
	}
	type dev struct {
		inst *swtpm.Instance
		tpm  *tpmkey.TPM
		keys *tpmkey.Keys
		dev  *devicesdk.Device
	}
	devs := make([]*dev, cfg.TPMDevices)
	defer func() {
		for _, d := range devs {
			if d == nil {
				continue
			}
			if d.tpm != nil {
				d.tpm.Close()
			}
			if err := d.inst.Stop(); err != nil && !errors.Is(err, swtpm.ErrExited) {
				e.Logf("stop swtpm pid %d: %v", d.inst.PID(), err)
			}
		}
	}()
	url := "https://" + fg.API
	var entries []api.EKRegisterRequest
	for i := range devs {
		id := fmt.Sprintf("tpm-%03d", i)
		dir := filepath.Join(e.Work, "tpm", id)
		inst, err := swtpm.Start(ctx, swtpm.Options{Dir: filepath.Join(dir, "tpm"), Manufacturer: e.tpmMfr})
		if err != nil {
			return fmt.Errorf("%s: swtpm: %w", id, err)
		}
		d := &dev{inst: inst}
		devs[i] = d
		if d.tpm, err = tpmkey.Open(inst.SocketPath()); err != nil {
			return fmt.Errorf("%s: open TPM: %w", id, err)
		}
		if d.keys, err = d.tpm.LoadOrCreateKeys(filepath.Join(dir, "keys")); err != nil {
			return fmt.Errorf("%s: TPM keys: %w", id, err)
		}
		if d.dev, err = devicesdk.New(devicesdk.Config{DeviceID: id, Key: d.keys.Signer(), StateDir: filepath.Join(dir, "state"), EnrollURL: url, RootCAs: e.Roots}); err != nil {
			return err
		}
		entries = append(entries, api.EKRegisterRequest{EKCert: d.keys.EK().CertDER, DeviceID: id, Group: "bench"})
	}
	if _, err := admin.ImportEKs(ctx, api.EKImportRequest{Entries: entries}); err != nil {
		// a reused working directory has them registered already
		e.Logf("  EK import: %v (reused working directory?)", err)
	}
	// a first enrollment each, outside the measurement
	for _, d := range devs {
		if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
			return fmt.Errorf("%s: first TPM enrollment: %w", d.dev.ID(), err)
		}
	}
	e.Logf("%s: %d swtpm devices, %d enrollments each per run, all at once (fleetgate only)", S7T, len(devs), cfg.TPMRounds)
	for rep := range cfg.Reps {
		meter, err := startCPU(fg.PID)
		if err != nil {
			return err
		}
		start := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, len(devs))
		for i, d := range devs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range cfg.TPMRounds {
					if ctx.Err() != nil {
						errs[i] = ctx.Err()
						return
					}
					if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
						errs[i] = fmt.Errorf("%s: %w", d.dev.ID(), err)
						return
					}
				}
			}()
		}
		wg.Wait()
		wall := time.Since(start)
		cpu, err := meter.since()
		if err != nil {
			return err
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		n := float64(len(devs) * cfg.TPMRounds)
		v := Values{
			"enrollments/s":        n / wall.Seconds(),
			"server CPU µs/enroll": us(cpu) / n,
			"per core /s (CPU)":    n / cpu.Seconds(),
		}
		res.Add(S7T, "fleetgate", v)
		e.Logf("  %s #%d fleetgate %s", S7T, rep+1, brief(v))
	}
	return nil
}
