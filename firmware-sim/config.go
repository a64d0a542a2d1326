package sim

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"time"
)

// Scenarios.
const (
	ScenarioSteady  = "steady"
	ScenarioRevoke  = "revoke"
	ScenarioRestart = "restart"
	ScenarioRenew   = "renew"
	ScenarioStorm   = "storm"
)

// Config of a simulation run.
type Config struct {
	// ServerURL is the enrollment/admin API, e.g. https://localhost:8443.
	ServerURL string
	// BrokerAddr is the broker's mTLS address, e.g. localhost:8883.
	BrokerAddr string
	// ServerName is the TLS name of the broker (default "localhost").
	ServerName string
	// DataDir of the gateway, for the operator credentials and root CA.
	DataDir string
	// Spawn runs a gateway of fleetsim's own (fleetgate init + serve in the
	// work dir, stopped at the end); needed by the restart and renew
	// scenarios. FleetgateBin is its binary (default: next to fleetsim).
	Spawn        bool
	FleetgateBin string
	// WorkDir keeps device state (default: a temp dir, removed).
	WorkDir  string
	Devices  int
	Prefix   string
	Group    string
	Messages int // telemetry messages per device in the steady phase
	Interval time.Duration
	Payload  int
	Scenario string
	// RevokeFraction of the fleet is revoked by the revoke scenario.
	RevokeFraction float64
	// CertTTL is the device certificate lifetime of a spawned gateway for
	// the renew scenario (default 20s).
	CertTTL time.Duration
	Logger  *slog.Logger
	// Progress receives human-readable progress lines (nil: none).
	Progress io.Writer
	// TPM is TPMSwtpm (default) or TPMNone.
	TPM string
	// Manufacture is how each swtpm gets its EK certificate: "ecc" (the
	// default: a P-256 EK certified from Go, as a factory line does; tens
	// of TPMs a second) or "swtpm_setup" (RSA 2048 and P-384 EKs by
	// swtpm_setup and swtpm_localca; about 4 a second).
	Manufacture string
	// SkipRegistration leaves the EKs unregistered (a factory that forgot),
	// to exercise the refusal path and its runbook.
	SkipRegistration bool
	// OnFleet, if set, is called with the PIDs of the swtpm processes once
	// they run (tests use it to check none is left behind).
	OnFleet func(swtpmPIDs []int)

	roots *x509.CertPool
}

func (c *Config) defaults() error {
	if c.Devices <= 0 {
		c.Devices = 3
	}
	if c.Prefix == "" {
		// A fresh prefix per run: devices of an earlier run keep their IDs
		// (and their registered EKs) in the registry.
		b := make([]byte, 2)
		_, _ = rand.Read(b)
		c.Prefix = fmt.Sprintf("sim-%x", b)
	}
	if c.Group == "" {
		c.Group = "sim"
	}
	if c.Messages <= 0 {
		c.Messages = 5
	}
	if c.Payload <= 0 {
		c.Payload = 64
	}
	if c.ServerName == "" {
		c.ServerName = "localhost"
	}
	if c.TPM == "" {
		c.TPM = TPMSwtpm
	}
	if c.TPM != TPMSwtpm && c.TPM != TPMNone {
		return fmt.Errorf("tpm %q: want swtpm or none", c.TPM)
	}
	switch c.Manufacture {
	case "":
		c.Manufacture = ManufactureECC
	case ManufactureECC, ManufactureSwtpmSetup:
	default:
		return fmt.Errorf("manufacture %q: want %s or %s", c.Manufacture, ManufactureECC, ManufactureSwtpmSetup)
	}
	if c.Scenario == "" {
		c.Scenario = ScenarioSteady
	}
	switch c.Scenario {
	case ScenarioSteady, ScenarioRevoke, ScenarioStorm:
	case ScenarioRestart, ScenarioRenew:
		if !c.Spawn {
			return fmt.Errorf("scenario %s restarts or reconfigures the gateway: run it with --spawn", c.Scenario)
		}
	default:
		return fmt.Errorf("scenario %q: want steady, revoke, restart, renew or storm", c.Scenario)
	}
	if c.RevokeFraction <= 0 || c.RevokeFraction > 1 {
		c.RevokeFraction = 0.2
	}
	if c.CertTTL <= 0 {
		c.CertTTL = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}
