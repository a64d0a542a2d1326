package keystore_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ThalesGroup/crypto11"

	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore/keystoretest"
)

// caAndLeaf makes a CA certificate for key (self-signed through it) and
// returns it with a function issuing leaves signed through key.
func caAndLeaf(t testing.TB, key crypto.Signer) (*x509.Certificate, func(...crypto.Signer) *x509.Certificate) {
	t.Helper()
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keystore test CA"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatalf("self-sign through the store: %v", err)
	}
	caCert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	n := int64(1)
	issue := func(other ...crypto.Signer) *x509.Certificate {
		key := key
		if len(other) > 0 {
			key = other[0] // the same key, reopened
		}
		n++
		lt := &x509.Certificate{SerialNumber: big.NewInt(n), Subject: pkix.Name{CommonName: fmt.Sprintf("device-%d", n)},
			NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, lt, caCert, leafKey.Public(), key)
		if err != nil {
			t.Fatalf("issue through the store: %v", err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return caCert, issue
}

func verifyLeaf(t *testing.T, caCert, leaf *x509.Certificate) {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("certificate signed through the store does not verify: %v", err)
	}
}

func TestFileKeyStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ca", "issuing.key")
	k, err := keystore.Generate("file:" + path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("generated key mode %04o, want 0600", fi.Mode().Perm())
	}
	caCert, issue := caAndLeaf(t, k)
	verifyLeaf(t, caCert, issue())

	if _, err := keystore.Generate(path); !errors.Is(err, keystore.ErrKeyExists) {
		t.Fatalf("second Generate: %v, want ErrKeyExists", err)
	}
	k2, err := keystore.Open(path) // a bare path is a file key
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Public().(*ecdsa.PublicKey).Equal(k.Public()) || k2.Store() != "file" {
		t.Fatal("reopened file key differs")
	}
	for _, mode := range []os.FileMode{0o640, 0o604, 0o644} {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		_, err := keystore.Open(path)
		if !errors.Is(err, keystore.ErrInsecure) || !strings.Contains(err.Error(), "chmod 600") {
			t.Fatalf("mode %04o: %v, want ErrInsecure naming chmod 600", mode, err)
		}
	}
	if _, err := keystore.Open("file:" + path + ".missing"); !errors.Is(err, keystore.ErrNoKey) {
		t.Fatalf("missing file: %v, want ErrNoKey", err)
	}
}

func TestPKCS11GenerateOpenSign(t *testing.T) {
	tk := keystoretest.SoftHSM(t, "fleetgate-ca")
	uri := tk.URI("issuing-ca")

	k, err := keystore.Generate(uri)
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	defer k.Close()
	if strings.Contains(k.Ref(), tk.PIN) || !strings.Contains(k.Ref(), "pin-value=REDACTED") {
		t.Fatalf("Ref() shows the PIN or lost it: %s", k.Ref())
	}
	// Ask the token itself about the private key.
	attrs, err := keystore.Context(k).GetAttributes(keystore.Underlying(k),
		[]crypto11.AttributeType{crypto11.CkaExtractable, crypto11.CkaSensitive, crypto11.CkaPrivate, crypto11.CkaToken})
	if err != nil {
		t.Fatal(err)
	}
	want := map[crypto11.AttributeType]bool{crypto11.CkaExtractable: false, crypto11.CkaSensitive: true, crypto11.CkaPrivate: true, crypto11.CkaToken: true}
	for a, w := range want {
		v := attrs[a]
		if v == nil || len(v.Value) != 1 || (v.Value[0] != 0) != w {
			t.Errorf("token says attribute %#x = %v, want %v", a, v, w)
		}
	}
	caCert, issue := caAndLeaf(t, k)
	verifyLeaf(t, caCert, issue())

	if _, err := keystore.Generate(uri); !errors.Is(err, keystore.ErrKeyExists) {
		t.Fatalf("second Generate: %v, want ErrKeyExists", err)
	}
	k2, err := keystore.Open(uri)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if !k2.Public().(*ecdsa.PublicKey).Equal(k.Public()) {
		t.Fatal("reopened key differs")
	}
	verifyLeaf(t, caCert, issue(k2))

	// A key the token lets out is refused.
	ctx := keystore.Context(k)
	pub, _ := crypto11.NewAttributeSetWithIDAndLabel([]byte{9}, []byte("exportable"))
	priv, _ := crypto11.NewAttributeSetWithIDAndLabel([]byte{9}, []byte("exportable"))
	_ = priv.Set(crypto11.CkaExtractable, true)
	_ = priv.Set(crypto11.CkaSensitive, false)
	if _, err := ctx.GenerateECDSAKeyPairWithAttributes(pub, priv, elliptic.P256()); err != nil {
		t.Fatal(err)
	}
	_, err = keystore.Open(strings.Replace(uri, "object=issuing-ca", "object=exportable", 1))
	if !errors.Is(err, keystore.ErrInsecure) {
		t.Fatalf("extractable key: %v, want ErrInsecure", err)
	}
	// The failures of a server start: no other context is open (with one
	// open, the token's login is shared and any PIN would do).
	k.Close()
	k2.Close()
	// Every failure is clear and never shows the PIN.
	for _, c := range []struct {
		name, ref string
		kind      error
		says      string
	}{
		{"wrong PIN", strings.Replace(uri, "pin-value="+tk.PIN, "pin-value=0000-wrong", 1), keystore.ErrStore, "wrong PIN"},
		{"missing token", strings.Replace(uri, "token="+tk.Label, "token=no-such-token", 1), keystore.ErrStore, "no such token"},
		{"missing module", strings.Replace(uri, tk.Module, "/nonexistent/libpkcs11.so", 1), keystore.ErrStore, "module /nonexistent/libpkcs11.so"},
		{"missing key", strings.Replace(uri, "object=issuing-ca", "object=nope", 1), keystore.ErrNoKey, "no private key"},
		{"no module-path", "pkcs11:token=x;object=y?pin-value=" + tk.PIN, keystore.ErrBadRef, "module-path"},
	} {
		_, err := keystore.Open(c.ref)
		if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%s: %v, want %v saying %q", c.name, err, c.kind, c.says)
		}
		if err != nil && (strings.Contains(err.Error(), tk.PIN) || strings.Contains(err.Error(), "0000-wrong")) {
			t.Errorf("%s: error shows the PIN: %v", c.name, err)
		}
	}
}

func TestPKCS11URIRedactionAndPINSource(t *testing.T) {
	pinFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pinFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := keystore.Redact("pkcs11:token=a%20b;object=ca?module-path=/m.so&pin-value=s3cret")
	if got != "pkcs11:token=a%20b;object=ca?module-path=/m.so&pin-value=REDACTED" {
		t.Fatalf("Redact: %s", got)
	}
	_, err := keystore.Open("pkcs11:token=t;object=ca?module-path=/nonexistent.so&pin-source=file:" + pinFile)
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("pin-source: %v", err)
	}

}

const tpmHandle = "0x81000110"

func TestTPMGenerateOpenSign(t *testing.T) {
	sock := keystoretest.TPM(t)
	ref := "tpm:handle=" + tpmHandle + ";device=" + sock
	k, err := keystore.Generate(ref)
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	caCert, issue := caAndLeaf(t, k)
	verifyLeaf(t, caCert, issue())
	if _, err := keystore.Generate(ref); !errors.Is(err, keystore.ErrKeyExists) {
		t.Fatalf("second Generate: %v, want ErrKeyExists", err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	// Open checks fixedTPM/fixedParent/sensitiveDataOrigin on the TPM's
	// public area: the key cannot be duplicated out.
	k2, err := keystore.Open(ref)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer k2.Close()
	if !k2.Public().(*ecdsa.PublicKey).Equal(k.Public()) {
		t.Fatal("reopened key differs")
	}
	verifyLeaf(t, caCert, issue(k2))

	if _, err := keystore.Open("tpm:handle=0x81000111;device=" + sock); !errors.Is(err, keystore.ErrNoKey) {
		t.Fatalf("empty handle: %v, want ErrNoKey", err)
	}
	if _, err := keystore.Open("tpm:handle=0x81000110;device=/nonexistent/tpm"); !errors.Is(err, keystore.ErrStore) || !strings.Contains(err.Error(), "no TPM at") {
		t.Fatalf("missing TPM: %v", err)
	}
	if _, err := keystore.Open("tpm:handle=0x01000110"); !errors.Is(err, keystore.ErrBadRef) {
		t.Fatalf("bad handle: %v", err)
	}
}

// BenchmarkIssue measures certificates issued per second through each
// store (x509.CreateCertificate of a P-256 client certificate).
func BenchmarkIssue(b *testing.B) {
	run := func(b *testing.B, k keystore.Key) {
		_, issue := caAndLeaf(b, k)
		b.ResetTimer()
		for b.Loop() {
			issue()
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
	}
	b.Run("file", func(b *testing.B) {
		k, err := keystore.Generate(filepath.Join(b.TempDir(), "k.pem"))
		if err != nil {
			b.Fatal(err)
		}
		run(b, k)
	})
	b.Run("pkcs11", func(b *testing.B) {
		tk := keystoretest.SoftHSM(b, "bench")
		k, err := keystore.Generate(tk.URI("ca"))
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		run(b, k)
	})
	b.Run("tpm", func(b *testing.B) {
		sock := keystoretest.TPM(b)
		k, err := keystore.Generate("tpm:handle=" + tpmHandle + ";device=" + sock)
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		run(b, k)
	})
}
