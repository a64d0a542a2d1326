package server

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

// The NATS security settings are checked together: a client listener
// needs users, external-NATS settings need nats_url.
func TestNATSSecuritySettings(t *testing.T) {
	cluster := []string{"--cluster-name", "fg", "--node-name", "n1", "--nats-listen", "127.0.0.1:6222", "--nats-routes", "a:1,b:2"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{append(cluster, "--nats-client-addr", "127.0.0.1:4222"), "needs nats_client_users"},
		{append(cluster, "--nats-ca", "ca.pem"), "need nats_url"},
		{[]string{"--nats-url", "tls://x:4222", "--node-name", "n1", "--nats-cert", "c.pem"}, "go together"},
		{[]string{"--nats-url", "tls://x:4222", "--node-name", "n1", "--nats-allow-unsynced"}, "nothing is checked"},
		{[]string{"--nats-url", "tls://x:4222", "--node-name", "n1", "--nats-client-users", "u"}, "need cluster_name"},
		{[]string{"--nats-url", "nats://u:p@x:4222", "--node-name", "n1"}, "--nats-allow-plaintext"},
		{[]string{"--nats-url", "tls://x:4222,x:4223", "--node-name", "n1"}, "x:4223"},
		{[]string{"--nats-url", "tls://x:4222", "--node-name", "n1", "--nats-monitor-urls", "http://x:8222"}, "--nats-allow-plaintext"},
		{append(cluster, "--nats-allow-plaintext"), "need nats_url"},
	} {
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		Flags(fs, Defaults())
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		if _, err := Load(fs, func(string) string { return "" }); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error about %q", tc.args, err, tc.want)
		}
	}
}

func writeUsers(t *testing.T, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// The users file is refused when others may read it or a line is wrong;
// a monitor user reads JetStream's information but no record, and
// writes nothing.
func TestNATSClientUsers(t *testing.T) {
	for name, tc := range map[string]struct {
		content string
		mode    os.FileMode
		want    string
	}{
		"readable by others": {"ops:0123456789abcdef:monitor\n", 0o644, "must be 0600"},
		"a short password":   {"ops:short:monitor\n", 0o600, "shorter than 16"},
		"an unknown role":    {"ops:0123456789abcdef:root\n", 0o600, "not monitor or admin"},
		"no user":            {"# nobody\n", 0o600, "names no user"},
		"twice":              {"ops:0123456789abcdef:monitor\nops:0123456789abcdef:admin\n", 0o600, "twice"},
	} {
		if _, err := readNATSUsers(writeUsers(t, tc.content, tc.mode)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
	users, err := readNATSUsers(writeUsers(t, "# tools\nops:0123456789abcdef:monitor\n", 0o600))
	if err != nil {
		t.Fatal(err)
	}
	c := natstest.StartWith(t, 3, func(i int, cfg *natsnode.Config) { cfg.ClientUsers = append(cfg.ClientUsers, users...) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	js, err := jetstream.New(c.Connect(0))
	if err != nil {
		t.Fatal(err)
	}
	kv, err := natsnode.Bucket(ctx, js, "sec")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "k", []byte("record")); err != nil {
		t.Fatal(err)
	}
	u := strings.Replace(c.Nodes[0].ClientURL(), "tls://", "tls://ops:0123456789abcdef@", 1)
	nc, err := nats.Connect(u, nats.RootCAs(c.CAFile), nats.MaxReconnects(0), nats.CustomInboxPrefix(MonitorInboxPrefix("ops")))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	mjs, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mjs.AccountInfo(ctx); err != nil {
		t.Fatalf("monitor: account information: %v", err)
	}
	if _, err := mjs.Stream(ctx, "KV_sec"); err != nil {
		t.Fatalf("monitor: stream information: %v", err)
	}
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 3*time.Second) }
	c1, cancel1 := short()
	defer cancel1()
	if _, err := mjs.Publish(c1, "$KV.sec.k", []byte("forged")); err == nil {
		t.Fatal("monitor wrote a record")
	}
	c2, cancel2 := short()
	defer cancel2()
	if m, err := mjs.Stream(c2, "KV_sec"); err == nil {
		if msg, err := m.GetLastMsgForSubject(c2, "$KV.sec.k"); err == nil {
			t.Fatalf("monitor read %q", msg.Data)
		}
	}
	e, err := kv.Get(ctx, "k")
	if err != nil || string(e.Value()) != "record" {
		t.Fatalf("record after the monitor: %v %v", e, err)
	}
}

// With monitoring URLs, a node refuses to start on an external NATS that
// acknowledges before it syncs, unless nats_allow_unsynced (an error in
// the log); one that syncs is accepted.
func TestExternalNATSSyncCheck(t *testing.T) {
	urls := map[bool]string{}
	for _, sync := range []bool{true, false} {
		srv, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: natsserver.RANDOM_PORT, HTTPHost: "127.0.0.1",
			HTTPPort: natsserver.RANDOM_PORT, JetStream: true, StoreDir: t.TempDir(), SyncAlways: sync, NoSigs: true})
		if err != nil {
			t.Fatal(err)
		}
		srv.Start()
		t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
		if !srv.ReadyForConnections(30 * time.Second) {
			t.Fatal("nats-server not ready")
		}
		urls[sync] = "http://" + srv.MonitorAddr().String()
	}
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, nil))
	if err := checkExternalSync(natsnode.ExternalAuth{}, NATSSecurity{MonitorURLs: []string{urls[true]}}, log); err != nil {
		t.Fatalf("synced: %v", err)
	}
	err := checkExternalSync(natsnode.ExternalAuth{}, NATSSecurity{MonitorURLs: []string{urls[true], urls[false]}}, log)
	if !errors.Is(err, natsnode.ErrUnsynced) || !strings.Contains(err.Error(), "nats_allow_unsynced") {
		t.Fatalf("unsynced: %v", err)
	}
	if err := checkExternalSync(natsnode.ExternalAuth{}, NATSSecurity{MonitorURLs: []string{urls[false]}, AllowUnsynced: true}, log); err != nil {
		t.Fatalf("unsynced, allowed: %v", err)
	}
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "STARTING ANYWAY") {
		t.Fatalf("no error logged for an allowed unsynced NATS:\n%s", logs.String())
	}
}

// A NATS URL without TLS is refused (TestNATSSecuritySettings) unless
// nats_allow_plaintext, which starts with an ERROR in the log naming the
// plaintext URLs (without their passwords).
func TestExternalNATSPlaintextAllowed(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	Flags(fs, Defaults())
	args := []string{"--nats-url", "nats://u:secretpw@127.0.0.1:4222", "--node-name", "n1", "--nats-allow-plaintext",
		"--nats-monitor-urls", "http://127.0.0.1:8222"}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(fs, func(string) string { return "" })
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	var logs strings.Builder
	logPlaintext(cfg.Cluster, slog.New(slog.NewTextHandler(&logs, nil)))
	l := logs.String()
	if !strings.Contains(l, "level=ERROR") || !strings.Contains(l, "PLAINTEXT") || !strings.Contains(l, "http://127.0.0.1:8222") ||
		strings.Contains(l, "secretpw") {
		t.Fatalf("log of an allowed plaintext NATS:\n%s", l)
	}
	logs.Reset()
	cfg.Cluster.NATSURL, cfg.Cluster.Security.MonitorURLs = "tls://127.0.0.1:4222", []string{"https://127.0.0.1:8222"}
	logPlaintext(cfg.Cluster, slog.New(slog.NewTextHandler(&logs, nil)))
	if logs.Len() != 0 {
		t.Fatalf("TLS URLs logged as plaintext:\n%s", logs.String())
	}
}
