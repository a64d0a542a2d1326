package enroll_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// The EST conformance tests speak to the server only through clients
// nobody on the project wrote: curl for RFC 7030's HTTP and openssl for its
// PKCS#7 and ASN.1. (No EST client library can be had here: the module
// proxy refuses GlobalSign's, and Debian packages none; docs/libraries.md.)

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
				t.Fatalf("%s not installed", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
}

// estTools holds the files curl and openssl work with.
type estTools struct {
	t   *testing.T
	g   *testenv.Gateway
	dir string
	ca  string
}

func newESTTools(t *testing.T, g *testenv.Gateway) *estTools {
	needTools(t, "curl", "openssl")
	dir := t.TempDir()
	ca := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: g.CA.Root.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return &estTools{t: t, g: g, dir: dir, ca: ca}
}

func (e *estTools) run(stdin []byte, name string, args ...string) []byte {
	e.t.Helper()
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		e.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// curl sends an EST request with curl and returns the status, the headers
// (lower-cased names) and the body decoded from base64 as RFC 7030 says.
func (e *estTools) curl(path string, args ...string) (int, http.Header, []byte) {
	e.t.Helper()
	hdrFile := filepath.Join(e.dir, "headers")
	base := []string{"-sS", "--cacert", e.ca, "-D", hdrFile, "-o", "-"}
	out := e.run(nil, "curl", append(append(base, args...), e.g.URL()+path)...)
	raw, err := os.ReadFile(hdrFile)
	if err != nil {
		e.t.Fatal(err)
	}
	status, hdr := 0, http.Header{}
	for _, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "HTTP/") {
			f := strings.Fields(line)
			if len(f) > 1 {
				status = atoi(f[1])
			}
		} else if k, v, ok := strings.Cut(line, ":"); ok {
			hdr.Add(k, strings.TrimSpace(v))
		}
	}
	if status != http.StatusOK {
		return status, hdr, out
	}
	der, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(out), nil)))
	if err != nil {
		e.t.Fatalf("%s: body is not base64: %v", path, err)
	}
	return status, hdr, der
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// certs lists, with openssl, the certificates of a DER PKCS#7 and checks
// the structure is certs-only (no signer infos, no content): RFC 7030 4.1.3
// and 4.2.3 answers are "degenerate" SignedData.
func (e *estTools) certs(p7 []byte) []*x509.Certificate {
	e.t.Helper()
	out := e.run(p7, "openssl", "pkcs7", "-inform", "DER", "-print_certs")
	var certs []*x509.Certificate
	for rest := out; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			e.t.Fatal(err)
		}
		certs = append(certs, c)
	}
	// openssl's parse of the whole structure: a certs-only answer has an
	// empty signerInfos SET and no encapsulated content.
	asn := string(e.run(p7, "openssl", "asn1parse", "-inform", "DER"))
	if strings.Contains(asn, "messageDigest") || strings.Contains(asn, "signingTime") {
		e.t.Fatalf("answer carries signer information, not certs-only:\n%s", asn)
	}
	return certs
}

// TestESTConformance runs the four RFC 7030 operations fleetgate serves
// with curl and openssl: cacerts (4.1), csrattrs (4.5), simpleenroll with
// the token as Basic credentials (4.2.1) and simplereenroll with the issued
// certificate (4.2.2). Each enrollment answer must hold exactly the issued
// certificate (4.2.3): a strict client refuses anything else after the
// token has been spent.
func TestESTConformance(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	e := newESTTools(t, g)

	st, hdr, p7 := e.curl(api.PathESTCACerts)
	if st != http.StatusOK || !strings.HasPrefix(hdr.Get("Content-Type"), "application/pkcs7-mime") {
		t.Fatalf("cacerts: %d %q", st, hdr.Get("Content-Type"))
	}
	if cas := e.certs(p7); len(cas) != 2 || !cas[0].Equal(g.CA.Issuing()) || !cas[1].Equal(g.CA.Root) {
		t.Fatalf("cacerts: %d certificates", len(cas))
	}

	// csrattrs: served, encoded as 4.5.2 says, and asking for what
	// enrollment enforces (an EC P-256 key, ECDSA with SHA-256)
	st, hdr, attrs := e.curl(api.PathESTCSRAttrs)
	if st != http.StatusOK || hdr.Get("Content-Type") != "application/csrattrs" ||
		!strings.EqualFold(hdr.Get("Content-Transfer-Encoding"), "base64") {
		t.Fatalf("csrattrs: %d %q %q", st, hdr.Get("Content-Type"), hdr.Get("Content-Transfer-Encoding"))
	}
	asn := string(e.run(attrs, "openssl", "asn1parse", "-inform", "DER"))
	for _, want := range []string{"ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1"} {
		if !strings.Contains(asn, want) {
			t.Fatalf("csrattrs does not name %s:\n%s", want, asn)
		}
	}

	// simpleenroll with a key and CSR made by openssl
	keyFile, csrFile := filepath.Join(e.dir, "key.pem"), filepath.Join(e.dir, "csr.der")
	e.run(nil, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", keyFile, "-subj", "/CN=est-std", "-outform", "DER", "-out", csrFile)
	csr, _ := os.ReadFile(csrFile)
	b64 := filepath.Join(e.dir, "csr.b64")
	os.WriteFile(b64, []byte(base64.StdEncoding.EncodeToString(csr)), 0o644)
	pub := e.run(nil, "openssl", "pkey", "-in", keyFile, "-pubout", "-outform", "DER")

	tok := g.Token(t, "est-std", "lab", time.Hour)
	st, _, p7 = e.curl(api.PathESTSimpleEnroll, "-u", "est-std:"+tok,
		"-H", "Content-Type: application/pkcs10", "-H", "Content-Transfer-Encoding: base64", "--data-binary", "@"+b64)
	if st != http.StatusOK {
		t.Fatalf("simpleenroll: %d", st)
	}
	issued := e.certs(p7)
	if len(issued) != 1 {
		t.Fatalf("simpleenroll answered %d certificates, RFC 7030 4.2.3 wants only the issued one", len(issued))
	}
	cert := issued[0]
	if der, _ := x509.MarshalPKIXPublicKey(cert.PublicKey); !bytes.Equal(der, pub) || cert.URIs[0].String() != "spiffe://test.fleetgate/device/est-std" {
		t.Fatalf("issued certificate is not for openssl's key and device: %v", cert.URIs)
	}

	// simplereenroll, authenticated by the issued certificate
	certFile := filepath.Join(e.dir, "cert.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644)
	st, _, p7 = e.curl(api.PathESTSimpleReenroll, "--cert", certFile, "--key", keyFile,
		"-H", "Content-Type: application/pkcs10", "--data-binary", "@"+b64)
	if st != http.StatusOK {
		t.Fatalf("simplereenroll: %d", st)
	}
	renewed := e.certs(p7)
	if len(renewed) != 1 {
		t.Fatalf("simplereenroll answered %d certificates, want only the issued one", len(renewed))
	}
	if renewed[0].SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatal("simplereenroll did not issue a new certificate")
	}
	d, err := g.Admin.Device(t.Context(), "est-std")
	if err != nil || d.Serial != fmtSerial(renewed[0]) {
		t.Fatalf("registry does not hold the renewed certificate: %+v %v", d, err)
	}
}

func estCSR(t *testing.T, key any) *x509.CertificateRequest {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

// TestESTRefusalKeepsToken: a request EST refuses before redemption (wrong
// content type, malformed body, a key we do not issue for, another
// device's name) leaves the token usable.
func TestESTRefusalKeepsToken(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	e := newESTTools(t, g)
	tok := g.Token(t, "est-keep", "lab", time.Hour)
	hc := client(g, nil)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	good := base64.StdEncoding.EncodeToString(estCSR(t, key).Raw)
	for _, tc := range []struct {
		name, user, ct, body string
	}{
		{"wrong content type", "est-keep", "text/plain", good},
		{"not base64", "est-keep", api.ContentTypePKCS10, "!!!"},
		{"not a CSR", "est-keep", api.ContentTypePKCS10, base64.StdEncoding.EncodeToString([]byte("garbage"))},
		{"RSA key", "est-keep", api.ContentTypePKCS10, base64.StdEncoding.EncodeToString(estCSR(t, rsaKey).Raw)},
		{"another device", "est-other", api.ContentTypePKCS10, good},
	} {
		req, _ := http.NewRequest(http.MethodPost, g.URL()+api.PathESTSimpleEnroll, strings.NewReader(tc.body))
		req.Header.Set("Content-Type", tc.ct)
		req.SetBasicAuth(tc.user, tok)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode < 400 {
			t.Fatalf("%s: %d", tc.name, resp.StatusCode)
		}
	}
	b64 := filepath.Join(e.dir, "csr.b64")
	os.WriteFile(b64, []byte(good), 0o644)
	st, _, p7 := e.curl(api.PathESTSimpleEnroll, "-u", "est-keep:"+tok, "-H", "Content-Type: application/pkcs10", "--data-binary", "@"+b64)
	if st != http.StatusOK {
		t.Fatalf("the token was consumed by a refused request: simpleenroll %d", st)
	}
	if n := len(e.certs(p7)); n != 1 {
		t.Fatalf("%d certificates", n)
	}
}
