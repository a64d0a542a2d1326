package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// walk calls fn for every command of the tree under c.
func walk(c *cobra.Command, fn func(*cobra.Command)) {
	fn(c)
	for _, s := range c.Commands() {
		if s.Name() != "help" && s.Name() != "completion" {
			walk(s, fn)
		}
	}
}

// pathArgs is a command's path without the root: "devices list".
func pathArgs(c *cobra.Command) []string {
	return strings.Fields(strings.TrimPrefix(c.CommandPath(), "fleetgate"))
}

// run runs the CLI with args (and the server flags when the command has
// them) and returns its output and error.
func run(t *testing.T, g *testenv.Gateway, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	c := root()
	c.SetOut(&out)
	c.SetErr(&errb)
	if cmd, _, err := c.Find(args); err == nil && cmd.Flag("server") != nil && g != nil {
		args = append(args, "--server", g.URL(), "--data-dir", g.DataDir)
	}
	c.SetArgs(args)
	err := c.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

// fleetWithTraffic starts a gateway with a device (sensor-1, group lab)
// connected, subscribed and holding a retained message, and a service
// connected twice (backend and backend:2).
func fleetWithTraffic(t *testing.T) *testenv.Gateway {
	t.Helper()
	g := testenv.Start(t, testenv.Options{})
	d := g.EnrollDevice(t, "sensor-1", "lab")
	tcfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	dc, err := g.MQTT(t, "sensor-1", nil, func(o *paho.ClientOptions) { o.SetTLSConfig(tcfg) })
	if err != nil {
		t.Fatal(err)
	}
	if tok := dc.Subscribe("devices/sensor-1/commands/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if tok := dc.Publish("devices/sensor-1/state", 1, true, `{"on":true}`); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	svc := g.Service(t, "backend")
	for _, id := range []string{"backend", "backend:2"} {
		if _, err := g.MQTT(t, id, &svc); err != nil {
			t.Fatalf("service connection %s: %v", id, err)
		}
	}
	g.Token(t, "spare-1", "lab", time.Hour)
	return g
}

// jsonRuns are the arguments each command with --json runs with, in
// order (reads first, then changes). A command with --json that is not
// here runs without arguments.
var jsonRuns = [][]string{
	{"devices", "list"}, {"devices", "list", "--group", "lab", "--online", "true"}, {"devices", "show", "device/sensor-1"},
	{"tokens", "list"}, {"tokens", "list", "--state", "unused"}, {"services", "list"}, {"services", "show", "service/backend"},
	{"operators", "list"}, {"operators", "whoami"}, {"clients", "list"}, {"clients", "list", "--online", "true"},
	{"clients", "show", "device/sensor-1"}, {"retained", "list"}, {"policy", "show"}, {"audit"},
	{"tokens", "create", "--device", "spare-2"}, {"services", "issue", "--name", "billing"}, {"services", "renew", "billing"},
	{"operators", "add", "--name", "viewer", "--role", "read-only"}, {"devices", "set", "sensor-1", "--tag", "floor=2"},
	{"clients", "disconnect", "backend:2"}, {"retained", "delete", "devices/sensor-1/state"},
	{"services", "revoke", "billing", "--reason", "decommissioned"}, {"operators", "remove", "viewer"},
	{"devices", "suspend", "sensor-1"}, {"devices", "resume", "sensor-1"}, {"groups", "suspend", "lab"}, {"groups", "resume", "lab"},
	{"devices", "revoke", "sensor-1", "--reason", "stolen"}, {"groups", "revoke", "lab", "--reason", "site closed"},
}

// cliGroups are the operator CLI's command groups: each of their commands
// with --json must be in jsonRuns.
var cliGroups = map[string]bool{"devices": true, "tokens": true, "services": true, "operators": true, "clients": true,
	"retained": true, "groups": true, "policy": true, "audit": true, "certificates": true}

// localCommands work without a server: they have no server flags.
var localCommands = map[string]bool{"init": true, "policy default": true, "tpm check": true}

// TestCLIConsistency walks every command: each --json output parses;
// an unknown subcommand and a stray argument exit with status 2; the
// local commands have no server flags.
func TestCLIConsistency(t *testing.T) {
	g := fleetWithTraffic(t)
	ran := map[string]bool{}
	ts, err := g.Admin.Tokens(context.Background(), url.Values{"device": {"spare-1"}})
	if err != nil || len(ts) != 1 {
		t.Fatalf("tokens: %v %v", ts, err)
	}
	dir := t.TempDir()
	ek, ek2, csv := filepath.Join(dir, "ek.pem"), filepath.Join(dir, "ek2.pem"), filepath.Join(dir, "fleet.csv")
	writeEK(t, ek)
	writeEK(t, ek2)
	if err := os.WriteFile(csv, []byte("ek2.pem,tpm-2,lab\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(g.DataDir, "policy.yaml"), []byte(acl.DefaultFile), 0o644); err != nil {
		t.Fatal(err)
	}
	svc, err := g.Admin.Service(context.Background(), "backend")
	if err != nil {
		t.Fatal(err)
	}
	runs := append(jsonRuns, []string{"tokens", "revoke", ts[0].ID}, []string{"policy", "reload"},
		[]string{"devices", "register", "--ek-cert", ek, "--device", "tpm-1"}, []string{"devices", "import", csv},
		[]string{"certificates", "revoke", svc.Certificates[0].Serial, "--reason", "superseded"})
	for _, args := range runs {
		out, errOut, err := run(t, g, append(args, "--json")...)
		if err != nil {
			t.Fatalf("%v --json: %v\n%s", args, err, errOut)
		}
		var v any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("%v --json does not print JSON: %v\n%s", args, err, out)
		}
		c, _, _ := root().Find(args)
		ran[c.CommandPath()] = true
	}
	var checked int
	walk(root(), func(c *cobra.Command) {
		args := pathArgs(c)
		name := strings.Join(args, " ")
		switch {
		case c.HasSubCommands() && !c.HasParent():
		case c.HasSubCommands() && c.Flags().Lookup("json") == nil: // a group
			t.Run("unknown/"+name, func(t *testing.T) {
				_, _, err := run(t, nil, append(args, "no-such-command")...)
				if exitCode(err) != 2 {
					t.Fatalf("%s no-such-command: exit %d (%v), want 2", name, exitCode(err), err)
				}
			})
			checked++
		}
		if len(strings.Fields(c.Use)) == 1 && !c.HasSubCommands() && c.HasParent() {
			t.Run("stray/"+name, func(t *testing.T) {
				_, _, err := run(t, g, append(args, "stray-argument")...)
				if exitCode(err) != 2 || !strings.Contains(err.Error(), "stray-argument") {
					t.Fatalf("%s stray-argument: exit %d (%v), want 2 naming it", name, exitCode(err), err)
				}
			})
			checked++
		}
		if c.Flag("json") != nil && !ran[c.CommandPath()] {
			t.Run("json/"+name, func(t *testing.T) {
				out, errOut, err := run(t, g, append(args, "--json")...)
				if err != nil {
					if !cliGroups[args[0]] { // another team's command
						t.Skipf("%s --json needs arguments: add it to jsonRuns (%v %s)", name, err, errOut)
					}
					t.Fatalf("%s --json needs arguments: add it to jsonRuns (%v %s)", name, err, errOut)
				}
				var v any
				if err := json.Unmarshal([]byte(out), &v); err != nil {
					t.Fatalf("%s --json: %v\n%s", name, err, out)
				}
			})
		}
		if localCommands[name] {
			if c.Flag("server") != nil {
				t.Errorf("%s works locally but has --server", name)
			}
		}
	})
	for name := range localCommands {
		if c, _, err := root().Find(strings.Fields(name)); err != nil || c.Flag("server") != nil {
			t.Errorf("%s: %v, or it has --server", name, err)
		}
	}
	if checked < 25 {
		t.Fatalf("only %d checks: the walk missed commands", checked)
	}
	// audit export: JSON lines, oldest first.
	out, _, err := run(t, g, "audit", "export")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var prev uint64
	for i, l := range lines {
		var r struct{ Seq uint64 }
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("audit export line %d: %v: %q", i, err, l)
		}
		if i > 0 && r.Seq <= prev {
			t.Fatalf("audit export not oldest first at line %d", i)
		}
		prev = r.Seq
	}
	if len(lines) < 20 {
		t.Fatalf("audit export: %d records", len(lines))
	}
}

// TestRevokeOutputIsTruthful: devices suspend/revoke print "live session
// closed" only when one was, and accept the identity as printed.
func TestRevokeOutputIsTruthful(t *testing.T) {
	g := fleetWithTraffic(t)
	out, _, err := run(t, g, "devices", "suspend", "device/sensor-1")
	if err != nil || !strings.Contains(out, "live session closed") {
		t.Fatalf("suspend of a connected device: %v %q", err, out)
	}
	out, _, err = run(t, g, "devices", "revoke", "spiffe://test.fleetgate/device/sensor-1", "--reason", "stolen")
	if err != nil || !strings.Contains(out, "no live session") {
		t.Fatalf("revoke of a disconnected device: %v %q", err, out)
	}
	if _, _, err := run(t, g, "devices", "show", "service/backend"); exitCode(err) != 2 {
		t.Fatalf("a service identity as a device: %v", err)
	}
	_, _, err = run(t, g, "devices", "show", "nope")
	if err == nil || !strings.Contains(err.Error(), "device nope not found") || exitCode(err) != 1 {
		t.Fatalf("unknown device: %v", err)
	}
}
