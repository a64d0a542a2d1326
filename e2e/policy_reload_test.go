package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// policyWith is the default policy plus one device rule allowing publish
// on devices/{id}/<level>/#.
func policyWith(level string) string {
	return acl.DefaultFile + fmt.Sprintf(`  - name: extra-%s
    roles: [device]
    allow: [publish]
    topics: ["devices/{id}/%s/#"]
`, level, level)
}

// TestPolicyReloadLoadsTheFileTheOperatorWrote: a server started without a
// policy file; the operator writes <data-dir>/policy.yaml and reloads
// (admin API, then SIGHUP). The reload names the file and its rule count,
// and the new rule is enforced on a real client's publishes. A broken or
// missing file is refused (non-zero exit) and the policy in force stays.
func TestPolicyReloadLoadsTheFileTheOperatorWrote(t *testing.T) {
	e := initData(t)
	e.srv = serve(t, e.dataDir)
	ctx := context.Background()
	policyFile := filepath.Join(e.dataDir, "policy.yaml")

	recv := e.backendOnFleet(t)
	d, _ := e.enroll("dbg-1", "lab")
	c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: e.srv.Addrs.MQTT, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// delivered publishes on topic at QoS 0 (a refused QoS 0 publish is
	// dropped silently), then a QoS 1 marker on the device's telemetry on
	// the same connection: once the marker arrived, so has the first
	// message, if the broker let it through.
	n := 0
	delivered := func(topic string) bool {
		t.Helper()
		n++
		payload, marker := fmt.Sprintf("p-%d", n), fmt.Sprintf("m-%d", n)
		if err := c.Publish(ctx, topic, 0, false, []byte(payload)); err != nil {
			t.Fatalf("publish %s: %v", topic, err)
		}
		if err := c.Publish(ctx, "devices/dbg-1/telemetry/marker", 1, false, []byte(marker)); err != nil {
			t.Fatalf("publish marker: %v", err)
		}
		recv.wait(t, "devices/dbg-1/telemetry/marker", marker)
		for _, p := range recv.get(topic) {
			if p == payload {
				return true
			}
		}
		return false
	}
	reload := func() (string, error) {
		return run(t, bin(t, "fleetgate"), "policy", "reload", "--data-dir", e.dataDir, "--server", "https://"+e.srv.Addrs.API)
	}
	const debug, logs = "devices/dbg-1/debug/x", "devices/dbg-1/logs/x"
	if delivered(debug) {
		t.Fatal("debug publish delivered under the default policy")
	}

	// Without any file, a reload is refused: nothing to load.
	if out, err := reload(); err == nil || !strings.Contains(out, policyFile) {
		t.Fatalf("reload without a policy file: err=%v\n%s", err, out)
	}

	// 1. The operator writes the data directory's file and reloads.
	if err := os.WriteFile(policyFile, []byte(policyWith("debug")), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := reload()
	if err != nil {
		t.Fatalf("reload: %v\n%s", err, out)
	}
	if !strings.Contains(out, policyFile) || !strings.Contains(out, " 8 rules of the file") {
		t.Fatalf("reload answer does not name the file and its 8 rules:\n%s", out)
	}
	if !delivered(debug) {
		t.Fatal("rule of the reloaded file not in force")
	}
	if !strings.Contains(e.srv.Log(), "file="+policyFile) {
		t.Errorf("server log does not name the reloaded file:\n%s", e.srv.Log())
	}
	if audit := e.admin("audit", "--limit", "5"); !strings.Contains(audit, policyFile) {
		t.Errorf("audit record does not name the file:\n%s", audit)
	}

	// 2. SIGHUP: another file; wait for the server's log line.
	if err := os.WriteFile(policyFile, []byte(policyWith("logs")), 0o644); err != nil {
		t.Fatal(err)
	}
	hup := func(want string, count int) {
		t.Helper()
		if err := e.srv.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 10*time.Second, func() error {
			if strings.Count(e.srv.Log(), want) < count {
				return fmt.Errorf("no %q (%d) in the log yet", want, count)
			}
			return nil
		})
	}
	hup(`msg="policy reloaded" file=`+policyFile+" file_rules=8", 2)
	if !delivered(logs) || delivered(debug) {
		t.Fatal("SIGHUP did not put the file's rules in force")
	}

	// 3. A broken file: refused with its line, non-zero exit, old policy
	// stays; the same by SIGHUP.
	if err := os.WriteFile(policyFile, []byte("rules:\n  - name: broken\n    allow: [write]\n    topics: ['a/#/b']\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := reload(); err == nil || !strings.Contains(out, "policy refused") || !strings.Contains(out, "policy.yaml:2") {
		t.Fatalf("broken file reload: err=%v\n%s", err, out)
	}
	// Refused twice before: the reload without a file, and the one above.
	hup(`msg="policy reload refused`, 3)
	if !delivered(logs) {
		t.Fatal("old policy not in force after a refused reload")
	}

	// 3b. A file a lax decoder would load as something else (H1): a rule
	// for another group with the typo "group:" (it would apply to every
	// group, lab included), then a second document. Refused with the line;
	// the policy in force stays.
	for _, bad := range []struct{ src, want string }{
		{policyWith("logs") + "  - name: other-debug\n    roles: [device]\n    group: [other]\n    allow: [publish]\n    topics: [\"devices/{id}/debug/#\"]\n", "field group not found"},
		{policyWith("logs") + "---\n" + policyWith("debug"), "a second YAML document"},
	} {
		if err := os.WriteFile(policyFile, []byte(bad.src), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := reload(); err == nil || !strings.Contains(out, bad.want) {
			t.Fatalf("reload of a file with %q: err=%v\n%s", bad.want, err, out)
		}
		if !delivered(logs) || delivered(debug) {
			t.Fatal("policy in force changed after a refused strict reload")
		}
	}

	// 4. The file deleted: refused, the policy in force stays.
	if err := os.Remove(policyFile); err != nil {
		t.Fatal(err)
	}
	if out, err := reload(); err == nil || !strings.Contains(out, "does not exist") {
		t.Fatalf("reload after the file was deleted: err=%v\n%s", err, out)
	}
	if !delivered(logs) {
		t.Fatal("policy in force changed after a refused reload")
	}
}

// TestPolicyReloadOfADeletedConfiguredFileIsRefused: with --policy FILE,
// a reload after FILE was deleted fails loudly and names it; the policy
// in force stays (a device's own telemetry is still allowed, the extra
// rule of the deleted file still in force).
func TestPolicyReloadOfADeletedConfiguredFileIsRefused(t *testing.T) {
	e := initData(t)
	policyFile := filepath.Join(t.TempDir(), "site-policy.yaml")
	if err := os.WriteFile(policyFile, []byte(policyWith("debug")), 0o644); err != nil {
		t.Fatal(err)
	}
	e.srv = serve(t, e.dataDir, "--policy", policyFile)
	if !strings.Contains(e.srv.Log(), "file="+policyFile+" file_rules=8") {
		t.Errorf("start log does not name the policy file:\n%s", e.srv.Log())
	}
	// Even with a data-directory file present: the configured file is
	// what the operator means.
	if err := os.WriteFile(filepath.Join(e.dataDir, "policy.yaml"), []byte(acl.DefaultFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(policyFile); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, bin(t, "fleetgate"), "policy", "reload", "--data-dir", e.dataDir, "--server", "https://"+e.srv.Addrs.API)
	if err == nil || !strings.Contains(out, policyFile) || !strings.Contains(out, "policy refused") {
		t.Fatalf("reload of a deleted configured file: err=%v\n%s", err, out)
	}
	if !strings.Contains(e.srv.Log(), `msg="policy reload refused`) {
		t.Errorf("refusal not logged:\n%s", e.srv.Log())
	}

	recv := e.backendOnFleet(t)
	d, _ := e.enroll("dbg-2", "lab")
	c, err := d.Connect(context.Background(), devicesdk.ConnectOptions{BrokerAddr: e.srv.Addrs.MQTT, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Publish(context.Background(), "devices/dbg-2/debug/x", 1, false, []byte("still")); err != nil {
		t.Fatalf("publish under the old policy's extra rule: %v", err)
	}
	recv.wait(t, "devices/dbg-2/debug/x", "still")
}

// backendOnFleet issues the service "backend", connects it and subscribes
// it to devices/#; what it receives is collected.
func (e *env) backendOnFleet(t *testing.T) *collector {
	t.Helper()
	svcDir := filepath.Join(t.TempDir(), "backend")
	e.admin("services", "issue", "--name", "backend", "--out", svcDir)
	recv := newCollector()
	svc := connectPaho(t, e.srv.Addrs.MQTT, "backend", loadPair(t, svcDir), e.roots)
	if tok := svc.Subscribe("devices/#", 1, recv.handle); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("service subscribe: %v", tok.Error())
	}
	return recv
}
