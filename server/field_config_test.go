package server

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestMinTLSAndWSSSettings: --min-tls and --wss-listen come from the YAML
// file, the environment or a flag, reach the broker's configuration, and a
// version other than 1.2 or 1.3, or an address that is not host:port, is
// refused.
func TestMinTLSAndWSSSettings(t *testing.T) {
	cfgFile := filepath.Join(t.TempDir(), "fleetgate.yaml")
	if err := os.WriteFile(cfgFile, []byte("min_tls: \"1.2\"\nwss_listen: 127.0.0.1:8884\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	load := func(args []string, env map[string]string) (Config, error) {
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		Flags(fs, Defaults())
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return Load(fs, func(k string) string { return env[k] })
	}
	for _, tc := range []struct {
		name    string
		args    []string
		env     map[string]string
		min     uint16
		wss     string
		wantErr string
	}{
		{"default", nil, nil, tls.VersionTLS13, "", ""},
		{"file", []string{"--config", cfgFile}, nil, tls.VersionTLS12, "127.0.0.1:8884", ""},
		{"env", nil, map[string]string{"FLEETGATE_MIN_TLS": "1.2", "FLEETGATE_WSS_LISTEN": ":8884"}, tls.VersionTLS12, ":8884", ""},
		{"flag over file", []string{"--config", cfgFile, "--min-tls", "1.3"}, nil, tls.VersionTLS13, "127.0.0.1:8884", ""},
		{"TLS 1.1", []string{"--min-tls", "1.1"}, nil, 0, "", "min_tls"},
		{"bad address", []string{"--wss-listen", "8884"}, nil, 0, "", "wss_listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := load(tc.args, tc.env)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if bc := BrokerConfig(cfg); bc.MinTLS != tc.min || bc.WSSAddr != tc.wss {
				t.Errorf("broker MinTLS %x WSSAddr %q, want %x %q", bc.MinTLS, bc.WSSAddr, tc.min, tc.wss)
			}
		})
	}
}
