package main

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

func runTPMCheck(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	c := root()
	c.SetOut(&out)
	c.SetErr(&errb)
	c.SetArgs(append([]string{"tpm", "check"}, args...))
	err := c.ExecuteContext(context.Background())
	return out.String(), err
}

// TestTPMCheck: `fleetgate tpm check` prints the TPM attributes of a real
// swtpm EK certificate and which deny rule matches, or "allowed".
func TestTPMCheck(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	inst := swtpm.StartForTest(t, m)
	tpm, err := tpmkey.Open(inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tpm.EK()
	tpm.Close()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ekPEM := write("ek.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ek.CertDER}))
	ekDER := write("ek.der", ek.CertDER)
	rootsDir := filepath.Join(dir, "roots")
	if err := os.MkdirAll(rootsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	write("roots/mfr.pem", m.RootPEM())
	denySW := write("deny-swtpm.yaml", []byte("deny:\n  - name: no simulators\n    manufacturer: id:00001014\n    model: swtpm\n"))
	denyOther := write("deny-other.yaml", []byte("deny:\n  - manufacturer: id:49465800\n"))

	out, err := runTPMCheck(t, "--ek-cert", ekPEM, "--tpm-roots", rootsDir, "--tpm-deny-list", denyOther)
	if err != nil {
		t.Fatalf("allowed EK: %v\n%s", err, out)
	}
	for _, want := range []string{"manufacturer: id:00001014", "model:        swtpm", "version:      id:", "chain:       ok", "allowed (no rule of 1 matches)", "verdict:     allowed"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	out, err = runTPMCheck(t, "--ek-cert", ekDER, "--tpm-deny-list", denySW)
	if !errors.Is(err, errEKRefused) {
		t.Fatalf("denied EK: err = %v\n%s", err, out)
	}
	for _, want := range []string{`matches rule "no simulators"`, "REFUSED (ek_denied)", "verdict:     refused (ek_denied)", "chain:       not checked"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	tmpl, err := swtpm.EKCertTemplate(&rsa.PublicKey{N: testpki.ROCAModulus(t), E: 65537}, swtpm.SWTPMIdentity)
	if err != nil {
		t.Fatal(err)
	}
	rocaDER, err := m.IssueEKCert(tmpl, &rsa.PublicKey{N: testpki.ROCAModulus(t), E: 65537})
	if err != nil {
		t.Fatal(err)
	}
	out, err = runTPMCheck(t, "--ek-cert", write("roca.der", rocaDER))
	if !errors.Is(err, errEKRefused) || !strings.Contains(out, "REFUSED (ek_roca)") {
		t.Fatalf("ROCA EK: err = %v\n%s", err, out)
	}

	notEK := testpki.Issue(t, testpki.NewCA(t, "mfr"), testpki.Leaf{CN: "leaf"}).Certificate[0]
	out, err = runTPMCheck(t, "--ek-cert", write("leaf.der", notEK))
	if !errors.Is(err, errEKRefused) || !strings.Contains(out, "REFUSED (ek_key_usage)") {
		t.Fatalf("not an EK: err = %v\n%s", err, out)
	}

	bad := write("bad.yaml", []byte("deny:\n  - model: x\n    colour: red\n"))
	if _, err := runTPMCheck(t, "--ek-cert", ekPEM, "--tpm-deny-list", bad); err == nil || !strings.Contains(err.Error(), "colour") {
		t.Fatalf("bad deny-list: err = %v, want it named", err)
	}
}
