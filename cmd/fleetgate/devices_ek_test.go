package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

// writeEK writes a self-signed EK certificate (P-256) as PEM.
func writeEK(t *testing.T, path string) {
	t.Helper()
	der := testpki.SelfSignedEK(t) // an EK certificate by the TCG profile
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
}

func runCLI(t *testing.T, g *testenv.Gateway, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	c := root()
	c.SetOut(&out)
	c.SetErr(&errb)
	c.SetArgs(append(args, "--server", g.URL(), "--data-dir", g.DataDir))
	err = c.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

func TestDevicesRegisterAndImport(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	dir := t.TempDir()
	for _, n := range []string{"a", "b", "c", "d", "single"} {
		writeEK(t, filepath.Join(dir, "certs", n+".pem"))
	}
	if err := os.WriteFile(filepath.Join(dir, "certs", "garbage.pem"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}

	out, _, err := runCLI(t, g, "devices", "register", "--ek-cert", filepath.Join(dir, "certs", "single.pem"), "--device", "single-1", "--group", "lab")
	if err != nil || !strings.Contains(out, "registered device single-1 (group lab)") {
		t.Fatalf("register: %v %s", err, out)
	}

	bad := `# factory batch 7
ek_cert,device_id,group
certs/a.pem,dev-a,lab

certs/missing.pem,dev-m,lab
certs/garbage.pem,dev-g,lab
certs/b.pem,Not_Valid,lab
certs/c.pem,dev-c
certs/single.pem,dev-s,lab
certs/c.pem,dev-c2,lab
just-one-field
`
	if err := os.WriteFile(filepath.Join(dir, "bad.csv"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := runCLI(t, g, "devices", "import", filepath.Join(dir, "bad.csv"))
	if err == nil {
		t.Fatal("import of a bad file succeeded")
	}
	for _, want := range []string{
		"bad.csv:5: ek_cert_unreadable",
		"bad.csv:6: ek_cert_unreadable",
		"bad.csv:7: invalid_device_id",
		"bad.csv:9: ek_already_registered",
		"bad.csv:10: duplicate_entry",
		"bad.csv:11: line_format",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("report lacks %q:\n%s", want, stderr)
		}
	}
	if n := strings.Count(stderr, "bad.csv:"); n != 6 {
		t.Errorf("%d problems reported, want 6:\n%s", n, stderr)
	}
	if _, err := g.Admin.Device(context.Background(), "dev-a"); err == nil {
		t.Fatal("a refused import registered dev-a")
	}

	good := "certs/a.pem,dev-a,lab\ncerts/b.pem,dev-b\n" + filepath.Join(dir, "certs", "d.pem") + ",dev-d,lab\n"
	if err := os.WriteFile(filepath.Join(dir, "good.csv"), []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, err = runCLI(t, g, "devices", "import", filepath.Join(dir, "good.csv"))
	if err != nil || !strings.Contains(out, "registered 3 devices") {
		t.Fatalf("import: %v %s", err, out)
	}
	for _, id := range []string{"dev-a", "dev-b", "dev-d"} {
		if d, err := g.Admin.Device(context.Background(), id); err != nil || d.State != "registered" {
			t.Errorf("%s: %+v %v", id, d, err)
		}
	}
}
