package server

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

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

// TestDefaultsUnchanged: the defaults of every setting, as they were when
// each part kept its own (flags, the broker, the enrollment service).
func TestDefaultsUnchanged(t *testing.T) {
	d := Defaults()
	want := Config{
		DataDir: "./fleetgate-data", MQTTAddr: ":8883", APIAddr: ":8443", MetricsAddr: "127.0.0.1:9090",
		DeviceCertTTL: 90 * 24 * time.Hour, HandshakeTimeout: 10 * time.Second, MaxPending: 1024,
		MaxPacketSize: 256 << 10, LogLevel: "info", LogFormat: "text", TPMPolicy: "allowlist", EnrollURL: "https://localhost:8443",
		MsgRate: 100, MsgBurst: 200, ByteRate: 1 << 20, MaxSubscriptions: 32, MaxPendingPerIP: 64, MaxQoS: 2, ReceiveMaximum: 256,
		MaxQueuedDevice: 1000, MaxQueuedService: 10_000,
		HelloTimeout: 3 * time.Second, SubRate: 10, SubBurst: 100, MaxKeepalive: 1200,
		SweepInterval: 10 * time.Second,
		Cluster:       ClusterConfig{StaleAfter: time.Second, StaleCloseAfter: 15 * time.Second}, // no cluster: the single box
		MinTLS:        "1.3",
	}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("Defaults() = %+v\nwant %+v", d, want)
	}
	if errs := d.Validate(); len(errs) > 0 {
		t.Errorf("defaults do not validate: %v", errs)
	}
	bc := BrokerConfig(d)
	if bc.Limits.ByteBurst != 4<<20 || bc.Queues.Device.MaxOffline != 1000 || bc.Queues.Service.MaxOffline != 10_000 {
		t.Errorf("broker config from the defaults: %+v", bc)
	}
	d.MaxQueuedDevice = 0
	if q := BrokerConfig(d).Queues.Device.MaxOffline; q != -1 {
		t.Errorf("max_queued_device 0: MaxOffline %d, want -1 (no quota)", q)
	}
}
