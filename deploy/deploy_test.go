package deploy_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
	"github.com/fleetgate/fleetgate/server"
)

const (
	rulesFile     = "prometheus/fleetgate-alerts.yml"
	rulesTestFile = "prometheus/fleetgate-alerts_test.yml"
	dashboardFile = "grafana/fleetgate-dashboard.json"
	unitFile      = "systemd/fleetgate.service"
	exampleConfig = "fleetgate.example.yaml"
)

// notExported are the metric names the dashboard and the rules may use
// although no fleetgate process exports them, each with why. Every other
// name they use must be on a live server's /metrics.
var notExported = map[string]string{
	"up": "Prometheus's own series for each scrape target (FleetgateDown)",
}

// tool returns the path of a command-line tool, or skips the test (fails it
// under FLEETGATE_REQUIRE_TOOLS, as make test sets it).
func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatalf("%s not installed (Debian package: prometheus for promtool, systemd for systemd-analyze, haproxy)", name)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

func run(t *testing.T, stdin []byte, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatal(err)
	}
	return rf
}

// TestAlertRules: promtool accepts the rules and their unit tests pass, and
// the unit tests make every alert of the file fire at least once.
func TestAlertRules(t *testing.T) {
	promtool := tool(t, "promtool")
	if out, err := run(t, nil, promtool, "check", "rules", rulesFile); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	if out, err := run(t, nil, promtool, "test", "rules", rulesTestFile); err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
	b, err := os.ReadFile(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	var tf struct {
		Tests []struct {
			Name  string `yaml:"name"`
			Cases []struct {
				Alert string `yaml:"alertname"`
				Exp   []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(b, &tf); err != nil {
		t.Fatal(err)
	}
	fires := map[string]bool{}
	for _, tc := range tf.Tests {
		for _, c := range tc.Cases {
			if len(c.Exp) > 0 {
				fires[c.Alert] = true
			}
		}
	}
	n := 0
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" {
				continue
			}
			if !fires[r.Alert] {
				t.Errorf("alert %s: no unit test in %s makes it fire", r.Alert, rulesTestFile)
			}
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("alert %s: needs a severity label, a summary and a description", r.Alert)
			}
		}
	}
	if n < 10 {
		t.Fatalf("only %d rules read from %s", n, rulesFile)
	}
}

// metricRef finds metric names in PromQL: fleetgate's, the Go client's
// process and runtime collectors', and Prometheus's up.
var metricRef = regexp.MustCompile(`\b(fleetgate_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+|up)\b`)

// referencedMetrics returns every metric name the dashboard and the alert
// rules use, with where.
func referencedMetrics(t *testing.T) map[string]string {
	t.Helper()
	refs := map[string]string{}
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			for _, m := range metricRef.FindAllString(r.Expr, -1) {
				refs[m] = "alert " + r.Alert
			}
		}
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range metricRef.FindAllString(tg.Expr, -1) {
				refs[m] = "panel " + p.Title
			}
		}
	}
	return refs
}

// TestDashboard: the dashboard is JSON Grafana imports: unique panel IDs,
// every query panel has a target on the Prometheus data source variable,
// its grid has no overlapping panels, and promtool parses every query.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			GridPos struct{ H, W, X, Y int } `json:"gridPos"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Fatal("the dashboard needs a uid and a title")
	}
	ids := map[int]bool{}
	cells := map[[2]int]string{}
	queries := 0
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q is wider than the grid", p.Title)
		}
		for y := p.GridPos.Y; y < p.GridPos.Y+p.GridPos.H; y++ {
			for x := p.GridPos.X; x < p.GridPos.X+p.GridPos.W; x++ {
				if other, ok := cells[[2]int{x, y}]; ok {
					t.Fatalf("panels %q and %q overlap at %d,%d", other, p.Title, x, y)
				}
				cells[[2]int{x, y}] = p.Title
			}
		}
		if p.Type == "row" {
			continue
		}
		queries++
		if p.Datasource.UID != "${datasource}" || len(p.Targets) == 0 {
			t.Errorf("panel %q: no target on the data source variable", p.Title)
		}
		for _, tg := range p.Targets {
			if !strings.Contains(tg.Expr, `instance=~"$instance"`) {
				t.Errorf("panel %q: %q ignores the instance variable", p.Title, tg.Expr)
			}
		}
	}
	if queries < 20 {
		t.Fatalf("only %d panels", queries)
	}

	// Every panel's PromQL parses: promtool checks them as recording rules,
	// with Grafana's variables as Grafana would substitute them.
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			expr := strings.NewReplacer("$__rate_interval", "5m", "$instance", ".*").Replace(tg.Expr)
			n++
			fmt.Fprintf(&rules, "      - record: dashboard:panel_%d\n        expr: %s\n", n, strconv.Quote(expr))
		}
	}
	file := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	if err := os.WriteFile(file, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, nil, tool(t, "promtool"), "check", "rules", file); err != nil {
		t.Fatalf("a dashboard query does not parse: %v\n%s", err, out)
	}
}

// TestMetricsAndReferences runs a real server, drives the traffic that
// makes each of its labelled series appear (an enrollment, connections,
// a refused handshake, an ACL denial, a subscription over the limit, an
// offline session over its quota, a revocation closing a session), then
// checks its /metrics with `promtool check metrics` and that every metric
// the dashboard and the alert rules name is on it.
func TestMetricsAndReferences(t *testing.T) {
	promtool := tool(t, "promtool")
	ctx := context.Background()
	cfg := testenv.Config(t, testenv.Options{Limits: broker.Limits{MaxSubscriptions: 2}})
	cfg.MaxQueuedDevice = 1
	g := testenv.StartConfig(t, cfg)

	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	connect := func(d *devicesdk.Device, clean bool) *devicesdk.Client {
		c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: clean})
		if err != nil {
			t.Fatalf("connect %s: %v", d.ID(), err)
		}
		t.Cleanup(c.Close)
		return c
	}
	d1 := g.EnrollDevice(t, "d1", "lab")
	c1 := connect(d1, true)
	if err := c1.PublishTelemetry(ctx, "t", 1, []byte("1")); err != nil {
		t.Fatal(err)
	}
	// An ACL denial, and subscriptions over the limit of 2.
	if err := c1.Subscribe(ctx, "devices/#", 1, func(devicesdk.Message) {}); err == nil {
		t.Fatal("devices/# allowed to a device")
	}
	for _, f := range []string{"devices/d1/commands/a", "devices/d1/commands/b", "devices/d1/commands/c"} {
		_ = c1.Subscribe(ctx, f, 1, func(devicesdk.Message) {})
	}
	// An offline persistent session over its quota of 1.
	d2 := g.EnrollDevice(t, "d2", "lab")
	c2 := connect(d2, false)
	if err := c2.SubscribeCommands(ctx, 1, func(devicesdk.Message) {}); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	testenv.Eventually(t, 10*time.Second, func() error {
		if strings.Contains(g.Metrics(t), `fleetgate_broker_connections{role="device"} 1`) {
			return nil
		}
		return fmt.Errorf("d2 still online")
	})
	for i := range 3 {
		if tok := svc.Publish("devices/d2/commands/x", 1, false, strconv.Itoa(i)); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("command: %v", tok.Error())
		}
	}
	// A handshake with a certificate of a foreign CA.
	foreign := testpki.NewCA(t, "foreign")
	fc := testpki.Issue(t, foreign, testpki.Leaf{URI: "spiffe://test.fleetgate/device/d9", EKU: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if _, err := g.MQTT(t, "d9", &fc); err == nil {
		t.Fatal("a foreign CA's certificate connected")
	}
	// A revocation closing a live session.
	if _, err := g.Admin.DeviceAction(ctx, "d1", "revoke", "test"); err != nil {
		t.Fatal(err)
	}

	var text string
	testenv.Eventually(t, 15*time.Second, func() error {
		text = g.Metrics(t)
		for _, s := range []string{`fleetgate_broker_auth_failures_total{reason="unknown_ca"}`, `fleetgate_broker_acl_denied_total{direction="subscribe"}`,
			`fleetgate_broker_limit_hits_total{limit="subscriptions"}`, `fleetgate_broker_session_quota_dropped_total{role="device"}`,
			`fleetgate_broker_sessions_closed_total{reason="revoked"}`, `fleetgate_enrollments_total{method="token",outcome="ok"}`,
			`fleetgate_pki_certificate_expiry_timestamp_seconds{kind="issuing"`, `fleetgate_pki_certificate_expiry_timestamp_seconds{kind="root"`,
			`fleetgate_own_certificate_expiry_timestamp_seconds{cert="server"}`, "fleetgate_revocation_view_age_seconds 0",
			`fleetgate_devices{attestation="token",state="active"}`, `fleetgate_devices{attestation="token",state="revoked"}`} {
			if !strings.Contains(text, s) {
				return fmt.Errorf("no %s yet", s)
			}
		}
		return nil
	})

	if out, err := run(t, []byte(text), promtool, "check", "metrics"); err != nil {
		t.Errorf("promtool check metrics on the live /metrics: %v\n%s", err, out)
	}
	exported := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "# TYPE ") {
			f := strings.Fields(line)
			exported[f[2]] = true
			if f[3] == "histogram" || f[3] == "summary" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					exported[f[2]+s] = true
				}
			}
		}
	}
	refs := referencedMetrics(t)
	if len(refs) < 15 {
		t.Fatalf("only %d metric names found in the dashboard and the rules: %v", len(refs), refs)
	}
	for m, where := range refs {
		if _, ok := notExported[m]; ok {
			continue
		}
		if !exported[m] {
			t.Errorf("%s uses %s, which the server does not export", where, m)
		}
	}
	for m := range notExported {
		if exported[m] {
			t.Errorf("%s is exported now: remove it from notExported", m)
		}
		if _, ok := refs[m]; !ok {
			t.Errorf("notExported lists %s, which nothing uses", m)
		}
	}
}

// TestSystemdUnit: systemd accepts the unit, its hardening is in place
// (writable: the data directory only), and systemd-analyze security rates
// its exposure at most 2.0 ("OK").
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	directives := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("not a directive: %q", line)
		}
		directives[k] = append(directives[k], v)
	}
	for k, want := range map[string]string{
		"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
		"PrivateDevices": "yes", "CapabilityBoundingSet": "", "ReadWritePaths": "/var/lib/fleetgate",
		"StateDirectory": "fleetgate", "User": "fleetgate", "ExecReload": "/bin/kill -HUP $MAINPID",
		"RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "MemoryDenyWriteExecute": "yes", "UMask": "0077",
	} {
		if got := directives[k]; len(got) != 1 || got[0] != want {
			t.Errorf("%s=%q, want exactly %q", k, got, want)
		}
	}
	// The unit's data directory is the example configuration's.
	var ex struct {
		DataDir string `yaml:"data_dir"`
	}
	if eb, err := os.ReadFile(exampleConfig); err != nil || yaml.Unmarshal(eb, &ex) != nil || ex.DataDir != "/var/lib/fleetgate" {
		t.Errorf("the example configuration's data_dir %q is not the unit's writable path", ex.DataDir)
	}
	if !strings.Contains(directives["ExecStart"][0], "--config /etc/fleetgate/fleetgate.yaml") {
		t.Errorf("ExecStart does not read the configuration: %q", directives["ExecStart"])
	}

	analyze := tool(t, "systemd-analyze")
	// verify wants the executable to exist: point the copy at one.
	dir := t.TempDir()
	unit := filepath.Join(dir, "fleetgate.service")
	if err := os.WriteFile(unit, bytes.ReplaceAll(b, []byte("/usr/local/bin/fleetgate"), []byte("/bin/true")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run(t, nil, analyze, "verify", unit); err != nil || strings.Contains(out, "fleetgate.service:") {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err := run(t, nil, analyze, "security", "--offline=yes", unit)
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for fleetgate\.service: ([0-9.]+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	if lvl, _ := strconv.ParseFloat(m[1], 64); lvl > 2.0 {
		t.Errorf("exposure %s, want at most 2.0:\n%s", m[1], out)
	}
	t.Logf("systemd-analyze security: exposure %s", m[1])
}

// TestExampleConfig: the server's own strict loader reads the annotated
// example without a complaint, and the example names every setting of
// server.Config (a new setting must be added to it, with a comment).
func TestExampleConfig(t *testing.T) {
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	server.Flags(fs, server.Defaults())
	if err := fs.Set("config", exampleConfig); err != nil {
		t.Fatal(err)
	}
	cfg, err := server.Load(fs, func(string) string { return "" })
	if err != nil {
		t.Fatalf("the example configuration does not load: %v", err)
	}
	if cfg.DataDir != "/var/lib/fleetgate" || cfg.LogFormat != "json" {
		t.Errorf("loaded %+v", cfg)
	}
	b, err := os.ReadFile(exampleConfig)
	if err != nil {
		t.Fatal(err)
	}
	var named map[string]any
	if err := yaml.Unmarshal(b, &named); err != nil {
		t.Fatal(err)
	}
	var missing []string
	ct := reflect.TypeOf(server.Config{})
	for i := range ct.NumField() {
		key, _, _ := strings.Cut(ct.Field(i).Tag.Get("yaml"), ",")
		if key == "" || key == "-" {
			continue
		}
		if _, ok := named[key]; !ok {
			missing = append(missing, key)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		// What to paste: each missing setting with its flag's help and
		// default (settings are flags with - for _).
		var add strings.Builder
		for _, k := range missing {
			if f := fs.Lookup(strings.ReplaceAll(k, "_", "-")); f != nil {
				v := f.DefValue
				if v == "" || strings.ContainsAny(v, ":#{}[],&*!|>'\"%@`") {
					v = strconv.Quote(v)
				}
				fmt.Fprintf(&add, "# %s\n%s: %s\n", f.Usage, k, v)
			} else {
				fmt.Fprintf(&add, "%s: ...\n", k)
			}
		}
		t.Errorf("%s does not name the settings %v: add each, with a comment and its default, e.g.:\n%s", exampleConfig, missing, add.String())
	}
}
