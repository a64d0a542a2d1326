package server

import (
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// The cluster flags layer like every other setting, and their combinations
// are checked; without them the configuration is the single box.
func TestClusterSettings(t *testing.T) {
	load := func(args []string, env map[string]string) (Config, error) {
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		Flags(fs, Defaults())
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		return Load(fs, func(k string) string { return env[k] })
	}
	cfg, err := load(nil, nil)
	if err != nil || cfg.Cluster.Enabled() {
		t.Fatalf("defaults: cluster %+v, %v; want the single box", cfg.Cluster, err)
	}
	cfg, err = load([]string{"--cluster-name", "fg", "--node-name", "n1", "--nats-listen", "127.0.0.1:6222",
		"--nats-routes", "127.0.0.2:6222,127.0.0.3:6222", "--cluster-stale-after", "2s", "--cluster-stale-close-after", "4s", "--cluster-shutdown-timeout", "2s"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Cluster
	if !c.Enabled() || c.NodeName != "n1" || len(c.NATSRoutes) != 2 || c.NATSRoutes[1] != "127.0.0.3:6222" || c.StaleAfter != 2*time.Second ||
		c.StaleCloseAfter != 4*time.Second || c.closeAfter() != 4*time.Second || c.ShutdownTimeout != 2*time.Second {
		t.Fatalf("flags: %+v", c)
	}
	if d := (ClusterConfig{StaleAfter: 3 * time.Second}).closeAfter(); d != DefaultStaleCloseAfter {
		t.Fatalf("second bound for 0 with a 3s first bound: %s, want the default %s", d, DefaultStaleCloseAfter)
	}
	if d := (ClusterConfig{StaleAfter: 10 * time.Second}).closeAfter(); d != 20*time.Second {
		t.Fatalf("second bound for 0 with a 10s first bound: %s, want 20s", d)
	}
	cfg, err = load(nil, map[string]string{"FLEETGATE_NATS_URL": "tls://a:4222,tls://b:4222", "FLEETGATE_NODE_NAME": "e1"})
	if err != nil || cfg.Cluster.NATSURL != "tls://a:4222,tls://b:4222" || !cfg.Cluster.Enabled() {
		t.Fatalf("env: %+v %v", cfg.Cluster, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--cluster-name", "fg", "--nats-listen", "127.0.0.1:6222", "--nats-routes", "a:1,b:2"}, "node_name"},
		{[]string{"--cluster-name", "fg", "--node-name", "n1", "--nats-routes", "a:1,b:2"}, "nats_listen"},
		{[]string{"--cluster-name", "fg", "--node-name", "n1", "--nats-listen", "127.0.0.1:6222", "--nats-routes", "a:1"}, "at least 3 nodes"},
		{[]string{"--cluster-name", "fg", "--nats-url", "nats://x:4222", "--node-name", "n1", "--nats-listen", "127.0.0.1:6222", "--nats-routes", "a:1,b:2"}, "exclude each other"},
		{[]string{"--node-name", "n1"}, "need cluster_name"},
		{[]string{"--nats-url", "nats://x:4222", "--node-name", "n1", "--cluster-stale-after", "10ms"}, "below 100ms"},
		{[]string{"--nats-url", "nats://x:4222", "--node-name", "n1", "--cluster-stale-close-after", "1s"}, "must be above cluster_stale_after"},
		{[]string{"--nats-url", "nats://x:4222", "--node-name", "n1", "--cluster-stale-after", "20s"}, "must be above cluster_stale_after"},
		{[]string{"--nats-url", "nats://x:4222", "--node-name", "n1", "--cluster-shutdown-timeout", "-1s"}, "cluster_shutdown_timeout"},
	} {
		if _, err := load(tc.args, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error about %q", tc.args, err, tc.want)
		}
	}
}
