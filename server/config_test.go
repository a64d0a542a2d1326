package server

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/spf13/pflag"
)

// TestTPMDenyListSetting: the TPM deny-list file is set from the YAML file,
// the environment or the flag, flags winning.
func TestTPMDenyListSetting(t *testing.T) {
	cfgFile := filepath.Join(t.TempDir(), "fleetgate.yaml")
	if err := os.WriteFile(cfgFile, []byte("tpm_deny_list: /etc/fleetgate/from-file.yaml\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"default", nil, nil, ""},
		{"file", []string{"--config", cfgFile}, nil, "/etc/fleetgate/from-file.yaml"},
		{"env over file", []string{"--config", cfgFile}, map[string]string{"FLEETGATE_TPM_DENY_LIST": "/env.yaml"}, "/env.yaml"},
		{"flag over env", []string{"--tpm-deny-list", "/flag.yaml"}, map[string]string{"FLEETGATE_TPM_DENY_LIST": "/env.yaml"}, "/flag.yaml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
			Flags(fs, Defaults())
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			cfg, err := Load(fs, func(k string) string { return tc.env[k] })
			if err != nil {
				t.Fatal(err)
			}
			if cfg.TPMDenyList != tc.want {
				t.Errorf("TPMDenyList = %q, want %q", cfg.TPMDenyList, tc.want)
			}
		})
	}
}
