package attest_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

func TestROCAFingerprint(t *testing.T) {
	t.Parallel()
	n := testpki.ROCAModulus(t)
	if !attest.ROCAVulnerable(n) {
		t.Errorf("a modulus built as p, q = k*M + 65537^a mod M is not detected")
	}
	for range 5 {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		if attest.ROCAVulnerable(k.N) {
			t.Errorf("a Go-generated RSA modulus is flagged as ROCA-vulnerable")
		}
	}
	// One ROCA-structured prime is not enough for the fingerprint to miss
	// it, and a non-structured one breaks it.
	q, _ := rand.Prime(rand.Reader, 1024)
	if attest.ROCAVulnerable(new(big.Int).Mul(testpki.ROCAPrime(t, 1024), q)) {
		t.Log("a half-structured modulus matched (possible, rare)")
	}
	if attest.ROCAVulnerable(nil) || attest.ROCAVulnerable(big.NewInt(0)) {
		t.Error("nil or zero modulus flagged")
	}
}

func writeFile(t testing.TB, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "deny.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDenyList(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	parse := func(der []byte) *x509.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	swtpmLike := parse(pki.ekCert(t, &rsaKey.PublicKey, nil)) // id:00001014, swtpm, id:20191023
	roca := parse(pki.ekCert(t, &rsa.PublicKey{N: testpki.ROCAModulus(t), E: 65537}, nil))

	list, err := attest.LoadDenyList(writeFile(t, `
# TPMs this fleet refuses.
deny:
  - name: old swtpm firmware
    manufacturer: ID:00001014
    model: swtpm
    versions_below: id:20200101
  - name: one bad build
    manufacturer: id:49465800
    versions: [id:00070002]
`))
	if err != nil {
		t.Fatalf("LoadDenyList: %v", err)
	}
	if r, err := list.CheckEK(swtpmLike); !errors.Is(err, attest.ErrEKDenied) || r == nil || r.Name != "old swtpm firmware" {
		t.Errorf("CheckEK(swtpm id:20191023) = %v, %v; want denied by the first rule", r, err)
	}
	if _, err := list.CheckEK(roca); !errors.Is(err, attest.ErrEKROCA) {
		t.Errorf("CheckEK(ROCA modulus) = %v, want ErrEKROCA", err)
	}
	var none *attest.DenyList
	if _, err := none.CheckEK(roca); !errors.Is(err, attest.ErrEKROCA) {
		t.Errorf("without a deny-list, CheckEK(ROCA modulus) = %v, want ErrEKROCA", err)
	}
	if _, err := none.CheckEK(swtpmLike); err != nil {
		t.Errorf("without a deny-list, CheckEK(swtpm) = %v, want allowed", err)
	}
	newer, err := attest.ParseDenyList([]byte("deny:\n  - manufacturer: id:00001014\n    versions_below: id:20191023\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newer.CheckEK(swtpmLike); err != nil {
		t.Errorf("version id:20191023 is not below id:20191023, but CheckEK = %v", err)
	}
	other, _ := attest.ParseDenyList([]byte("deny:\n  - manufacturer: id:00001014\n    model: other\n"))
	if _, err := other.CheckEK(swtpmLike); err != nil {
		t.Errorf("a rule for another model denied swtpm: %v", err)
	}
	all, _ := attest.ParseDenyList([]byte("deny:\n  - manufacturer: id:00001014\n"))
	if _, err := all.CheckEK(swtpmLike); !errors.Is(err, attest.ErrEKDenied) {
		t.Errorf("a manufacturer-only rule did not deny: %v", err)
	}
	empty, err := attest.ParseDenyList(nil)
	if err != nil {
		t.Errorf("an empty deny-list is refused: %v", err)
	}
	if _, err := empty.CheckEK(swtpmLike); err != nil {
		t.Errorf("an empty deny-list denied: %v", err)
	}

	for _, bad := range []struct{ name, body, want string }{
		{"unknown field", "deny:\n  - manufacturer: x\n    modle: y\n", "modle"},
		{"unknown top-level field", "allow:\n  - manufacturer: x\n", "allow"},
		{"rule without manufacturer", "deny:\n  - model: x\n", "rule 1"},
		{"bad version bound", "deny:\n  - manufacturer: x\n    versions_below: 1.2.3\n", "versions_below"},
		{"empty version", "deny:\n  - manufacturer: x\n    versions: ['']\n", "versions"},
		{"not YAML", "deny: [\n", "deny"},
		{"two documents", "deny: []\n---\ndeny: []\n", "one YAML document"},
	} {
		_, err := attest.ParseDenyList([]byte(bad.body))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: err = %v, want an error mentioning %q", bad.name, err, bad.want)
		}
	}
	if _, err := attest.LoadDenyList(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("a missing deny-list file is accepted")
	}
}
