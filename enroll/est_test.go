package enroll_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
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

	"github.com/smallstep/pkcs7"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

// estDo sends an EST request the way RFC 7030 encodes it.
func estDo(t *testing.T, c *http.Client, method, url string, body []byte, user, pass string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = strings.NewReader(base64.StdEncoding.EncodeToString(body))
	}
	req, _ := http.NewRequest(method, url, rd)
	if body != nil {
		req.Header.Set("Content-Type", api.ContentTypePKCS10)
		req.Header.Set("Content-Transfer-Encoding", "base64")
	}
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// certsOnly decodes a base64 PKCS#7 certs-only body.
func certsOnly(t *testing.T, resp *http.Response, b []byte) []*x509.Certificate {
	t.Helper()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/pkcs7-mime") {
		t.Fatalf("Content-Type %q", ct)
	}
	der, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(b), nil)))
	if err != nil {
		t.Fatalf("body is not base64: %v", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatalf("not PKCS#7: %v", err)
	}
	return p7.Certificates
}

func TestEST(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	c := client(g, nil)
	base := g.URL()

	resp, b := estDo(t, c, http.MethodGet, base+api.PathESTCACerts, nil, "", "")
	cas := certsOnly(t, resp, b)
	if len(cas) != 2 || !cas[0].Equal(g.CA.Issuing()) || !cas[1].Equal(g.CA.Root) {
		t.Fatalf("cacerts returned %d certificates", len(cas))
	}

	key := testpki.NewKey(t)
	csr := csrFor(t, key)
	tok := g.Token(t, "est-dev", "lab", time.Hour)
	resp, b = estDo(t, c, http.MethodPost, base+api.PathESTSimpleEnroll, csr, "est-dev", tok)
	if resp.StatusCode != 200 {
		t.Fatalf("simpleenroll: %d %s", resp.StatusCode, b)
	}
	certs := certsOnly(t, resp, b)
	if !key.PublicKey.Equal(certs[0].PublicKey) {
		t.Fatal("issued certificate is not for the CSR key")
	}
	if certs[0].URIs[0].String() != "spiffe://test.fleetgate/device/est-dev" {
		t.Fatalf("identity %v", certs[0].URIs)
	}

	// The same token again, a wrong token, no credentials: refused.
	for _, tc := range []struct {
		name, user, pass string
		status           int
	}{
		{"a used token is refused", "est-dev", tok, 401},
		{"a wrong token is refused", "est-dev", "fgt_0011223344556677_" + strings.Repeat("A", 43), 401},
		{"no credentials are refused", "", "", 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, _ := estDo(t, c, http.MethodPost, base+api.PathESTSimpleEnroll, csrFor(t, testpki.NewKey(t)), tc.user, tc.pass)
			if resp.StatusCode != tc.status {
				t.Fatalf("got %d, want %d", resp.StatusCode, tc.status)
			}
			if resp.StatusCode == 401 && resp.Header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
		})
	}

	// simplereenroll over mTLS with the EST-issued certificate, same key.
	mtls := client(g, &tls.Certificate{Certificate: [][]byte{certs[0].Raw}, PrivateKey: key})
	resp, b = estDo(t, mtls, http.MethodPost, base+api.PathESTSimpleReenroll, csrFor(t, key), "", "")
	if resp.StatusCode != 200 {
		t.Fatalf("simplereenroll: %d %s", resp.StatusCode, b)
	}
	renewed := certsOnly(t, resp, b)
	if renewed[0].SerialNumber.Cmp(certs[0].SerialNumber) == 0 {
		t.Fatal("reenroll returned the same certificate")
	}
	// A different key is refused; no client certificate is refused.
	if resp, _ := estDo(t, mtls, http.MethodPost, base+api.PathESTSimpleReenroll, csrFor(t, testpki.NewKey(t)), "", ""); resp.StatusCode != 400 {
		t.Fatalf("reenroll with another key: %d", resp.StatusCode)
	}
	if resp, _ := estDo(t, c, http.MethodPost, base+api.PathESTSimpleReenroll, csrFor(t, key), "", ""); resp.StatusCode != 401 {
		t.Fatalf("reenroll without certificate: %d", resp.StatusCode)
	}
	d, err := g.Admin.Device(context.Background(), "est-dev")
	if err != nil || d.Serial != fmtSerial(renewed[0]) {
		t.Fatalf("registry does not hold the renewed certificate: %+v %v", d, err)
	}
}

func fmtSerial(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// TestESTWithCurlAndOpenSSL enrolls with clients nobody here wrote: curl
// speaks EST's HTTP, openssl reads the PKCS#7 answer.
func TestESTWithCurlAndOpenSSL(t *testing.T) {
	needTools(t, "curl", "openssl")
	g := testenv.Start(t, testenv.Options{})
	dir := t.TempDir()
	caFile := filepath.Join(dir, "root.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: g.CA.Root.Raw}), 0o644)
	keyFile, csrFile := filepath.Join(dir, "key.pem"), filepath.Join(dir, "csr.der")
	if out, err := exec.Command("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", keyFile, "-subj", "/CN=curl-dev", "-outform", "DER", "-out", csrFile).CombinedOutput(); err != nil {
		t.Fatalf("openssl req: %v\n%s", err, out)
	}
	csr, _ := os.ReadFile(csrFile)
	b64 := filepath.Join(dir, "csr.b64")
	os.WriteFile(b64, []byte(base64.StdEncoding.EncodeToString(csr)), 0o644)
	tok := g.Token(t, "curl-dev", "lab", time.Hour)
	out, err := exec.Command("curl", "-sS", "--fail", "--cacert", caFile, "-u", "curl-dev:"+tok,
		"-H", "Content-Type: application/pkcs10", "--data-binary", "@"+b64, g.URL()+api.PathESTSimpleEnroll).Output()
	if err != nil {
		t.Fatalf("curl simpleenroll: %v", err)
	}
	der, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(out), nil)))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("openssl", "pkcs7", "-inform", "DER", "-print_certs", "-noout")
	cmd.Stdin = bytes.NewReader(der)
	p, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("openssl pkcs7: %v\n%s", err, p)
	}
	if !strings.Contains(string(p), "CN = curl-dev") && !strings.Contains(string(p), "CN=curl-dev") {
		t.Fatalf("openssl does not show the issued certificate:\n%s", p)
	}
}
