// Command fleetsim runs a simulated device fleet against a running
// fleetgate and reports what happened. Its exit status says whether every
// check held.
package main

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	sim "github.com/fleetgate/fleetgate/firmware-sim"
	"github.com/fleetgate/fleetgate/server"
)

func main() {
	if err := root().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "fleetsim:", err)
		os.Exit(1)
	}
}

func root() *cobra.Command {
	r := &cobra.Command{Use: "fleetsim", Short: "Simulated IoT fleets against fleetgate", SilenceUsage: true, SilenceErrors: true}
	var cfg sim.Config
	var jsonOut string
	var register bool
	run := &cobra.Command{
		Use:   "run",
		Short: "Enroll, connect and run a simulated fleet; exit 1 if a check fails",
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			cfg.Progress = cmd.OutOrStdout()
			cfg.SkipRegistration = !register
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			rep, err := sim.Run(ctx, cfg)
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted; every swtpm and gateway this run started was stopped")
			}
			if err != nil {
				return err
			}
			rep.WriteTable(cmd.OutOrStdout())
			if jsonOut != "" {
				b, _ := json.MarshalIndent(rep, "", "  ")
				if err := os.WriteFile(jsonOut, b, 0o644); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "  JSON report: %s\n", jsonOut)
			}
			if !rep.OK() {
				return fmt.Errorf("some checks failed")
			}
			return nil
		},
	}
	f := run.Flags()
	f.StringVar(&cfg.ServerURL, "server", envOr("FLEETGATE_SERVER", "https://localhost:8443"), "enrollment/admin API URL")
	f.StringVar(&cfg.BrokerAddr, "broker", envOr("FLEETGATE_BROKER", "localhost:8883"), "broker mTLS address")
	f.StringVar(&cfg.DataDir, "data-dir", envOr("FLEETGATE_DATA_DIR", server.DefaultDataDir), "gateway data directory (operator credentials, root CA)")
	f.StringVar(&cfg.WorkDir, "work-dir", "", "where device state is kept (default: a temp dir, removed)")
	f.IntVar(&cfg.Devices, "devices", 3, "number of devices")
	f.StringVar(&cfg.Prefix, "prefix", "", "device ID prefix (default: sim-XXXX, new each run)")
	f.StringVar(&cfg.Group, "group", "sim", "device group")
	f.IntVar(&cfg.Messages, "messages", 5, "telemetry messages per device")
	f.DurationVar(&cfg.Interval, "interval", 0, "pause between a device's messages")
	f.IntVar(&cfg.Payload, "payload", 64, "telemetry payload size in bytes")
	f.StringVar(&jsonOut, "json", "", "write the report as JSON to this file")
	f.BoolVar(&register, "register", true, "register the devices' EKs as a factory would (false: enrollment must be refused)")
	f.StringVar(&cfg.Scenario, "scenario", sim.ScenarioSteady, "steady, revoke, restart, renew or storm")
	f.Float64Var(&cfg.RevokeFraction, "revoke-fraction", 0.2, "revoke scenario: the fraction of the fleet revoked mid-run")
	f.BoolVar(&cfg.Spawn, "spawn", false, "start a gateway of fleetsim's own (init + serve in the work dir); restart and renew need it")
	f.StringVar(&cfg.FleetgateBin, "fleetgate", "", "fleetgate binary for --spawn (default: next to fleetsim, or on PATH)")
	f.DurationVar(&cfg.CertTTL, "cert-ttl", 20*time.Second, "renew scenario: device certificate lifetime of the spawned gateway")
	f.StringVar(&cfg.TPM, "tpm", sim.TPMSwtpm, "swtpm: one software TPM per device, TPM attestation; none: software keys and bootstrap tokens")
	f.StringVar(&cfg.Manufacture, "manufacture", sim.ManufactureECC, "how each swtpm gets its EK certificate: ecc (a P-256 EK certified from Go, as a factory line does; fast) or swtpm_setup (RSA and P-384 EKs by swtpm_setup; about 4 a second)")
	r.AddCommand(run)
	return r
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
