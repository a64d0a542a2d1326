package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestConfigFileIsStrict: H1's class in the config file. An unknown key
// and a second YAML document are refused with the file and line; neither
// is dropped without a word.
func TestConfigFileIsStrict(t *testing.T) {
	for _, tc := range []struct{ name, src, want string }{
		{"unknown key", "data_dir: /var/lib/fleetgate\npolicy_file: /etc/p.yaml\n", "line 2: field policy_file not found"},
		{"second document", "data_dir: /var/lib/fleetgate\n---\ntpm_deny_list: /etc/deny.yaml\n", "fleetgate.yaml:2: a second YAML document"},
		{"key written twice", "policy: /a.yaml\npolicy: /b.yaml\n", `mapping key "policy" already defined`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfgFile := filepath.Join(t.TempDir(), "fleetgate.yaml")
			if err := os.WriteFile(cfgFile, []byte(tc.src), 0o600); err != nil {
				t.Fatal(err)
			}
			fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
			ServeFlags(fs, Defaults())
			if err := fs.Parse([]string{"--config", cfgFile}); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadServe(fs, func(string) string { return "" })
			if err == nil {
				t.Fatalf("accepted: %+v", cfg)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), cfgFile) {
				t.Fatalf("error lacks %q and the file:\n%v", tc.want, err)
			}
		})
	}
}
