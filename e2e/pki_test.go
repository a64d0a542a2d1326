package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// TestOfflineRootAndRotationWithTheCLI: the root CA is openssl's, kept
// outside the data directory. `fleetgate init --external-root` writes the
// issuing CA's CSR, openssl signs it, `fleetgate ca import-issuing`
// installs it; then, with the server running, `ca rotate` yields a CSR
// (the root is offline), openssl signs it, `ca import-issuing` makes it
// current through the admin API, `ca retire` is refused while a device
// holds the old CA's certificate and succeeds once it renewed. Real
// binaries throughout.
func TestOfflineRootAndRotationWithTheCLI(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatal("openssl not installed (FLEETGATE_REQUIRE_TOOLS is set)")
		}
		t.Skip("openssl not installed")
	}
	root := t.TempDir() // the offline root's machine
	openssl := func(args ...string) {
		t.Helper()
		cmd := exec.Command("openssl", args...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-keyout", "root.key",
		"-out", "root.crt", "-days", "3650", "-subj", "/O=Example/CN=Example offline root",
		"-addext", "basicConstraints=critical,CA:TRUE,pathlen:1", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
	os.WriteFile(filepath.Join(root, "issuing.ext"), []byte("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"), 0o644)
	sign := func(csr, out string) {
		t.Helper()
		openssl("x509", "-req", "-in", csr, "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial", "-days", "1825", "-extfile", "issuing.ext", "-out", out)
	}
	fg := bin(t, "fleetgate")
	dataDir := filepath.Join(t.TempDir(), "data")
	out, err := run(t, fg, "init", "--data-dir", dataDir, "--trust-domain", "e2e.fleetgate", "--external-root", filepath.Join(root, "root.crt"))
	if err != nil || !strings.Contains(out, "import-issuing") {
		t.Fatalf("init --external-root: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dataDir, ca.RootKeyFile)); err == nil {
		t.Fatal("init --external-root wrote a root key")
	}
	if out, err := run(t, "cp", filepath.Join(dataDir, ca.IssuingCSRFile), filepath.Join(root, "first.csr")); err != nil {
		t.Fatal(out)
	}
	sign("first.csr", "first.crt")
	if out, err := run(t, fg, "ca", "import-issuing", filepath.Join(root, "first.crt"), "--data-dir", dataDir); err != nil {
		t.Fatalf("import-issuing (init): %v\n%s", err, out)
	}
	e := &env{t: t, dataDir: dataDir}
	e.srv = serve(t, dataDir)
	roots := x509.NewCertPool()
	rb, _ := os.ReadFile(filepath.Join(root, "root.crt"))
	roots.AppendCertsFromPEM(rb)
	e.roots = roots

	caStatus := func() api.CAStatus {
		t.Helper()
		var st api.CAStatus
		if err := json.Unmarshal([]byte(e.admin("ca", "status", "--json")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	st := caStatus()
	if st.RootKeyOnline || len(st.Issuers) != 1 {
		t.Fatalf("status after init: %+v", st)
	}
	first := st.Current
	d, _ := e.enroll("cli-dev", "lab")

	csr := filepath.Join(root, "next.csr")
	if out := e.admin("ca", "rotate", "--csr-out", csr); !strings.Contains(out, "pending") {
		t.Fatalf("rotate with the root offline:\n%s", out)
	}
	sign("next.csr", "next.crt")
	if out := e.admin("ca", "import-issuing", filepath.Join(root, "next.crt")); !strings.Contains(out, "is current") {
		t.Fatalf("import-issuing:\n%s", out)
	}
	st = caStatus()
	if st.Current == first || len(st.Issuers) != 2 {
		t.Fatalf("status after the import: %+v", st)
	}
	for _, i := range st.Issuers {
		if i.ID == first && (i.State != "trusted" || i.ActiveDevices != 1) {
			t.Fatalf("old issuing CA: %+v", i)
		}
	}
	args := []string{"ca", "retire", first, "--data-dir", dataDir, "--server", "https://" + e.srv.Addrs.API}
	if out, err := run(t, fg, args...); err == nil || !strings.Contains(out, "ca_in_use") {
		t.Fatalf("retire while a device depends on it: %v\n%s", err, out)
	}
	if err := d.Renew(context.Background()); err != nil {
		t.Fatal(err)
	}
	// openssl agrees: the renewed certificate chains to the offline root.
	leaf := filepath.Join(root, "leaf.crt")
	os.WriteFile(leaf, ca.CertPEM(d.Leaf()), 0o644)
	openssl("verify", "-CAfile", "root.crt", "-untrusted", "next.crt", "leaf.crt")
	if out := e.admin("ca", "retire", first); !strings.Contains(out, "retired") {
		t.Fatalf("retire:\n%s", out)
	}
	// The operator certificate was re-issued: the CLI still works.
	st = caStatus()
	for _, i := range st.Issuers {
		if i.ID == first && i.State != "retired" {
			t.Fatalf("after retire: %+v", i)
		}
	}
	out = e.admin("ca", "status")
	if !strings.Contains(out, "retired") || !strings.Contains(out, "offline") {
		t.Fatalf("ca status:\n%s", out)
	}
	t.Logf("ca status after the rotation:\n%s", out)
}

// TestSplitBrokerFollowsRotation: a broker in its own process (--only
// broker) follows a rotation made at the enrollment service: a device
// enrolled on the new CA is admitted, the device on the old CA keeps its
// session until the retirement closes it, and the broker's feed, which
// authenticates with the operator certificate, survives the retirement
// (the re-issued certificate is read again).
func TestSplitBrokerFollowsRotation(t *testing.T) {
	e := initData(t)
	enr := serve(t, e.dataDir, "--only", "enroll")
	e.srv = enr
	enrollURL := "https://" + enr.Addrs.API
	brk := serve(t, e.dataDir, "--only", "broker", "--enroll-url", enrollURL)
	waitReady(t, brk)
	oldDev, _ := e.enroll("split-old", "lab")
	_, lostOld := connectWatched(t, e, brk.Addrs.MQTT, oldDev)

	var st api.CAStatus
	if err := json.Unmarshal([]byte(e.admin("ca", "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	oldID := st.Current
	t0 := time.Now()
	e.admin("ca", "rotate")
	newDev, _ := e.enroll("split-new", "lab")
	connectWatched(t, e, brk.Addrs.MQTT, newDev) // retried until the broker follows
	t.Logf("split mode: a device on the new CA admitted by the broker process %s after the rotation call", time.Since(t0).Round(time.Millisecond))
	select {
	case <-lostOld:
		t.Fatal("the rotation closed a session on the old CA")
	default:
	}
	if out, err := run(t, bin(t, "fleetgate"), "ca", "retire", oldID, "--force", "--data-dir", e.dataDir, "--server", enrollURL); err != nil {
		t.Fatalf("retire: %v\n%s", err, out)
	}
	select {
	case <-lostOld:
	case <-time.After(15 * time.Second):
		t.Fatal("the broker process kept a session on the retired CA")
	}
	// The feed still flows: a revocation after the retirement reaches the
	// broker process.
	_, lostNew := connectWatched(t, e, brk.Addrs.MQTT, newDev)
	e.admin("devices", "revoke", "split-new", "--reason", "split rotation test")
	select {
	case <-lostNew:
	case <-time.After(15 * time.Second):
		t.Fatal("a revocation after the retirement did not reach the broker process")
	}
	waitReady(t, brk)
}
