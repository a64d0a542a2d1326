package gateway_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/gateway"
	"github.com/fleetgate/fleetgate/internal/testenv"
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
		err := gateway.Run(ctx, gateway.Config{
			DataDir: testenv.Init(t), Only: gateway.OnlyEnroll, APIAddr: "127.0.0.1:0", MetricsAddr: "",
			TPMPolicy: "allowlist", TPMDenyListFile: tc.file,
		}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Run with deny-list %s: err = %v, want one mentioning %q", tc.file, err, tc.want)
		}
	}
}
