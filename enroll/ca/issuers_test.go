package ca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
)

func initDir(t *testing.T) (string, *ca.Authority) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	res, err := ca.Init(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	return dir, res.Authority
}

func issueDevice(t *testing.T, a *ca.Authority, name string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id, _ := identity.New(identity.RoleDevice, name)
	c, err := a.Issue(id, k.Public(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func verifies(c *x509.Certificate, pool *x509.CertPool) bool {
	_, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err == nil
}

func TestRotateOverlapRetire(t *testing.T) {
	dir, a := initDir(t)
	first := a.Current()
	old := issueDevice(t, a, "d1")
	next, err := a.Rotate()
	if err != nil {
		t.Fatal(err)
	}
	if a.Current().ID != next.ID || next.ID == first.ID {
		t.Fatalf("current %s after rotation to %s (first %s)", a.Current().ID, next.ID, first.ID)
	}
	if next.Cert.Subject.CommonName == first.Cert.Subject.CommonName {
		t.Fatalf("new issuing CA has the old one's name %q", next.Cert.Subject.CommonName)
	}
	fresh := issueDevice(t, a, "d2")
	if a.IssuerOf(fresh).ID != next.ID || a.IssuerOf(old).ID != first.ID {
		t.Fatal("IssuerOf names the wrong issuing CA")
	}
	if !strings.Contains(a.ChainPEM(old), string(ca.CertPEM(first.Cert))) {
		t.Fatal("chain of an old certificate does not carry its own issuing CA")
	}
	for _, c := range []*x509.Certificate{old, fresh} {
		if !verifies(c, a.ClientCAs()) {
			t.Fatalf("%s not trusted during the overlap", c.Subject.CommonName)
		}
	}
	// A restart reads the same set.
	b, err := ca.Load(dir, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if b.Current().ID != next.ID || len(b.Trusted()) != 2 {
		t.Fatalf("reloaded: current %s, %d trusted", b.Current().ID, len(b.Trusted()))
	}
	if _, err := b.Retire(next.ID); !errors.Is(err, ca.ErrIssuerIsCurrent) {
		t.Fatalf("retiring the current CA: %v", err)
	}
	if _, err := b.Retire(first.ID); err != nil {
		t.Fatal(err)
	}
	if verifies(old, b.ClientCAs()) || !verifies(fresh, b.ClientCAs()) {
		t.Fatal("after retirement the old CA is still trusted or the new one is not")
	}
	if _, err := b.CRLFor(first.ID, 1, nil, time.Hour); err == nil {
		t.Fatal("CRL signed for a retired CA")
	}
	crl, err := b.CRLFor(next.ID, 1, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	rl, err := x509.ParseRevocationList(crl)
	if err != nil || rl.CheckSignatureFrom(next.Cert) != nil {
		t.Fatalf("CRL of the new CA: %v", err)
	}
	c, err := ca.Load(dir, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Trusted()) != 1 || len(c.Issuers()) != 2 {
		t.Fatalf("after retirement and reload: %d trusted of %d", len(c.Trusted()), len(c.Issuers()))
	}
}

// signAsRoot signs csrPEM with the root key of dir as an external root
// would, with tmpl's constraints.
func signAsRoot(t *testing.T, dir string, csrPEM []byte, tmpl *x509.Certificate) []byte {
	t.Helper()
	root, err := ca.ReadCertFile(filepath.Join(dir, ca.RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	rootKey, err := ca.ReadKeyFile(filepath.Join(dir, ca.RootKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pemDecode(csrPEM)
	csr, err := x509.ParseCertificateRequest(blk)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.Subject = csr.Subject
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Minute), time.Now().Add(24*time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, csr.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return ca.CertPEM(c)
}

func TestPrepareAndImportIssuing(t *testing.T) {
	dir, a := initDir(t)
	first := a.Current()
	p, err := a.PrepareIssuing()
	if err != nil {
		t.Fatal(err)
	}
	if a.Current().ID != first.ID {
		t.Fatal("a pending issuing CA became current")
	}
	// Refused: not a CA; then a foreign key; then the right one.
	notCA := signAsRoot(t, dir, p.CSR, &x509.Certificate{KeyUsage: x509.KeyUsageDigitalSignature})
	if _, err := a.ImportIssuing(notCA); !errors.Is(err, ca.ErrBadIssuingCert) || !strings.Contains(err.Error(), "not a CA") {
		t.Fatalf("non-CA certificate: %v", err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherCSR, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, k)
	caTmpl := func() *x509.Certificate {
		return &x509.Certificate{BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	}
	if _, err := a.ImportIssuing(signAsRoot(t, dir, pemCSR(otherCSR), caTmpl())); !errors.Is(err, ca.ErrBadIssuingCert) {
		t.Fatalf("certificate for a key never prepared: %v", err)
	}
	iss, err := a.ImportIssuing(signAsRoot(t, dir, p.CSR, caTmpl()))
	if err != nil {
		t.Fatal(err)
	}
	if a.Current().ID != iss.ID || iss.ID != p.ID {
		t.Fatal("imported issuing CA is not current")
	}
	if c := issueDevice(t, a, "d"); !verifies(c, a.ClientCAs()) || a.IssuerOf(c).ID != iss.ID {
		t.Fatal("imported CA does not issue")
	}
	b, err := ca.Load(dir, ca.Options{})
	if err != nil || b.Current().ID != iss.ID || len(b.Trusted()) != 2 {
		t.Fatalf("reload after import: %v", err)
	}
}

func TestExternalRootWithOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatal("openssl not installed (FLEETGATE_REQUIRE_TOOLS is set)")
		}
		t.Skip("openssl not installed")
	}
	work := t.TempDir()
	openssl := func(args ...string) {
		t.Helper()
		cmd := exec.Command("openssl", args...)
		cmd.Dir = work
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	// The root CA lives here, with openssl, not in the data directory.
	openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-keyout", "root.key",
		"-out", "root.crt", "-days", "3650", "-subj", "/O=Example/CN=Example offline root",
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
	rootPEM, _ := os.ReadFile(filepath.Join(work, "root.crt"))
	dir := filepath.Join(t.TempDir(), "data")
	csr, err := ca.InitExternalRoot(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost"}}, rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ca.RootKeyFile)); err == nil {
		t.Fatal("a root key was written")
	}
	if _, err := ca.Load(dir, ca.Options{}); err == nil || !strings.Contains(err.Error(), "import-issuing") {
		t.Fatalf("Load before the import: %v", err)
	}
	os.WriteFile(filepath.Join(work, "issuing.csr"), csr, 0o644)
	os.WriteFile(filepath.Join(work, "ext.cnf"), []byte("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"), 0o644)
	// A leaf certificate is refused.
	openssl("x509", "-req", "-in", "issuing.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial", "-days", "365", "-out", "leaf.crt")
	leaf, _ := os.ReadFile(filepath.Join(work, "leaf.crt"))
	if _, err := ca.CompleteExternalRoot(dir, leaf, ca.Options{}); !errors.Is(err, ca.ErrBadIssuingCert) {
		t.Fatalf("a certificate without CA:TRUE: %v", err)
	}
	openssl("x509", "-req", "-in", "issuing.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial", "-days", "365", "-extfile", "ext.cnf", "-out", "issuing.crt")
	signed, _ := os.ReadFile(filepath.Join(work, "issuing.crt"))
	res, err := ca.CompleteExternalRoot(dir, signed, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.Load(dir, ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := issueDevice(t, a, "d1")
	os.WriteFile(filepath.Join(work, "device.crt"), ca.CertPEM(c), 0o644)
	openssl("verify", "-CAfile", "root.crt", "-untrusted", "issuing.crt", "device.crt")
	os.WriteFile(filepath.Join(work, "server.crt"), ca.CertPEM(res.Server), 0o644)
	openssl("verify", "-CAfile", "root.crt", "-untrusted", "issuing.crt", "server.crt")
	// No root key: rotation asks for the offline path.
	if _, err := a.Rotate(); !errors.Is(err, ca.ErrRootOffline) {
		t.Fatalf("rotate without the root key: %v", err)
	}
	p, err := a.PrepareIssuing()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(work, "next.csr"), p.CSR, 0o644)
	openssl("x509", "-req", "-in", "next.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial", "-days", "365", "-extfile", "ext.cnf", "-out", "next.crt")
	next, _ := os.ReadFile(filepath.Join(work, "next.crt"))
	if _, err := a.ImportIssuing(next); err != nil {
		t.Fatal(err)
	}
	if c := issueDevice(t, a, "d2"); a.IssuerOf(c).ID != p.ID {
		t.Fatal("the imported issuing CA does not sign")
	}
}

func pemDecode(b []byte) ([]byte, bool) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, false
	}
	return blk.Bytes, true
}

func pemCSR(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// Options.Key (a key store's signer for the first issuing CA, as
// pki-keystore's --ca-key gives it) stands for ca/issuing.key, also once
// a rotation wrote the issuer list.
func TestFirstIssuerKeyFromOptions(t *testing.T) {
	dir, _ := initDir(t)
	key, err := ca.ReadKeyFile(filepath.Join(dir, ca.IssuingKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, ca.IssuingKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Load(dir, ca.Options{}); err == nil {
		t.Fatal("Load without the key file nor Options.Key")
	}
	a, err := ca.Load(dir, ca.Options{Key: key, OCSPServer: []string{"http://ocsp.test/"}})
	if err != nil {
		t.Fatal(err)
	}
	first := a.Current().ID
	if _, err := a.Rotate(); err != nil {
		t.Fatal(err)
	}
	b, err := ca.Load(dir, ca.Options{Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if iss, ok := b.Issuer(first); !ok || iss.Signer() == nil || iss.State != ca.IssuerTrusted {
		t.Fatal("the first issuing CA lost its key after the rotation")
	}
	if c := issueDevice(t, a, "ocsp"); len(c.OCSPServer) != 1 {
		t.Fatalf("AIA OCSP: %v", c.OCSPServer)
	}
}

func TestNoKeysLoadsCertificatesOnly(t *testing.T) {
	dir, a := initDir(t)
	if _, err := a.Rotate(); err != nil {
		t.Fatal(err)
	}
	for _, i := range a.Issuers() {
		os.Remove(filepath.Join(dir, i.KeyRef)) // a host without the keys
	}
	b, err := ca.Load(dir, ca.Options{NoKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(b.Trusted()) != 2 || b.Current().ID != a.Current().ID {
		t.Fatal("NoKeys: wrong issuer set")
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id, _ := identity.New(identity.RoleDevice, "x")
	if _, err := b.Issue(id, k.Public(), time.Hour); err == nil {
		t.Fatal("signed without a key")
	}
}
