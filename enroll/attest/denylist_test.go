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

// TestDenyListVersionsAreNumbers: M5. versions and versions_below are TCG
// version numbers, compared as numbers: id:70002 is id:00070002, case and
// leading zeros do not matter, on the rule's side and the certificate's.
// A version that is not a number is refused in the file.
func TestDenyListVersionsAreNumbers(t *testing.T) {
	t.Parallel()
	l, err := attest.ParseDenyList([]byte("deny:\n  - name: exact\n    manufacturer: id:49465800\n    versions: [id:70002, ID:0007003e]\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		version string
		denied  bool
	}{
		{"id:00070002", true}, {"id:70002", true}, {"ID:00070002", true}, {" id:0007003E ", true}, {"id:7003e", true},
		{"id:00070003", false}, {"id:20191023", false},
		{"7.2", true}, // not a TCG version number: deny by default
	} {
		info := attest.TPMInfo{Manufacturer: "id:49465800", Model: "SLB9670", Version: tc.version}
		if got := l.Match(info) != nil; got != tc.denied {
			t.Errorf("certificate version %q: denied %t, want %t", tc.version, got, tc.denied)
		}
	}
	for _, bad := range []string{"7.2", "id:", "id:123456789", "0x70002", "id:7g"} {
		if _, err := attest.ParseDenyList([]byte("deny:\n  - manufacturer: x\n    versions: ['" + bad + "']\n")); err == nil || !strings.Contains(err.Error(), "versions holds") {
			t.Errorf("versions [%q]: %v, want refused", bad, err)
		}
	}
}

// TestDenyListCheckFirmware: M5. The signed firmwareVersion's upper 32
// bits (TPM_PT_FIRMWARE_VERSION_1) are judged by the rules with versions
// for the EK certificate's manufacturer and model.
func TestDenyListCheckFirmware(t *testing.T) {
	t.Parallel()
	l, err := attest.ParseDenyList([]byte(`
deny:
  - name: all swtpm
    manufacturer: id:00001014
    model: other
  - name: old swtpm
    manufacturer: id:00001014
    model: swtpm
    versions_below: id:20200101
  - name: one build
    manufacturer: id:49465800
    versions: [id:70002]
`))
	if err != nil {
		t.Fatal(err)
	}
	swtpmInfo := attest.TPMInfo{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20250101"}
	ifx := attest.TPMInfo{Manufacturer: "ID:49465800", Model: "SLB9670", Version: "id:00070055"}
	for _, tc := range []struct {
		name   string
		info   attest.TPMInfo
		fw     uint64
		denied string
	}{
		{"swtpm firmware below the bound", swtpmInfo, 0x20191023_00163636, "old swtpm"},
		{"swtpm firmware at the bound", swtpmInfo, 0x20200101_00000000, ""},
		{"exact version, any lower half", ifx, 0x00070002_12345678, "one build"},
		{"another version", ifx, 0x00070055_00000000, ""},
		{"another manufacturer", attest.TPMInfo{Manufacturer: "id:53544D20", Model: "swtpm"}, 0x1, ""},
	} {
		r, err := l.CheckFirmware(tc.info, tc.fw)
		switch {
		case tc.denied == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.denied != "" && (!errors.Is(err, attest.ErrFirmwareDenied) || r == nil || r.Name != tc.denied):
			t.Errorf("%s: rule %v, %v; want %q", tc.name, r, err, tc.denied)
		}
	}
	var nilList *attest.DenyList
	if _, err := nilList.CheckFirmware(swtpmInfo, 0); err != nil {
		t.Errorf("nil list: %v", err)
	}
}
