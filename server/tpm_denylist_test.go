package server_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// TestBadTPMDenyListStopsTheServer: a deny-list file that does not parse
// (or is missing) stops the enrollment service at start, naming the problem.
func TestBadTPMDenyListStopsTheServer(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "deny.yaml")
	if err := os.WriteFile(bad, []byte("deny:\n  - model: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, want string }{
		{bad, "manufacturer is required"},
		{filepath.Join(t.TempDir(), "missing.yaml"), "TPM deny-list"},
	} {
		// The deadline only keeps a server that wrongly started from
		// running forever; nothing is timed.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		cfg := server.Defaults()
		cfg.DataDir, cfg.Only, cfg.APIAddr, cfg.MetricsAddr = testenv.Init(t), server.OnlyEnroll, "127.0.0.1:0", ""
		cfg.TPMPolicy, cfg.TPMDenyList = "allowlist", tc.file
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		err := run(ctx, cfg)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Run with deny-list %s: err = %v, want one mentioning %q", tc.file, err, tc.want)
		}
	}
}

// run builds and runs a server as `fleetgate serve` does.
func run(ctx context.Context, cfg server.Config) error {
	s, err := server.New(cfg)
	if err != nil {
		return err
	}
	return s.Run(ctx)
}
