package enroll_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/api"
	"github.com/fleetgate/fleetgate/internal/testenv"
	est "github.com/fleetgate/fleetgate/third_party/globalsign-est"
)

// estClient is GlobalSign's EST client (third_party/globalsign-est), a
// strict RFC 7030 implementation nobody on the project wrote.
func estClient(g *testenv.Gateway) *est.Client {
	return &est.Client{Host: g.Addrs.API, ExplicitAnchor: g.Roots(), DisableKeepAlives: true}
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

var (
	oidECPublicKey = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}
	oidP256        = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
)

// TestESTStandardClient runs GlobalSign's EST client against the server:
// cacerts, csrattrs, simpleenroll with the token as Basic credentials,
// simplereenroll with the issued certificate. The client insists on
// RFC 7030 4.2.3: an enrollment answer holds exactly the issued
// certificate.
func TestESTStandardClient(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	c := estClient(g)

	cas, err := c.CACerts(ctx)
	if err != nil {
		t.Fatalf("cacerts: %v", err)
	}
	if len(cas) != 2 || !cas[0].Equal(g.CA.Issuing) || !cas[1].Equal(g.CA.Root) {
		t.Fatalf("cacerts: %d certificates", len(cas))
	}

	// csrattrs is served (the client would take a 404 as "nothing"), as
	// RFC 7030 4.5.2 encodes it, and says what we require: an EC P-256 key.
	resp, err := client(g, nil).Get(g.URL() + api.PathESTCSRAttrs)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/csrattrs" ||
		!strings.EqualFold(resp.Header.Get("Content-Transfer-Encoding"), "base64") {
		t.Fatalf("csrattrs: %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Content-Transfer-Encoding"))
	}
	attrs, err := c.CSRAttrs(ctx)
	if err != nil {
		t.Fatalf("csrattrs: %v", err)
	}
	found := false
	for _, a := range attrs.Attributes {
		if a.Type.Equal(oidECPublicKey) && len(a.Values) == 1 {
			if v, ok := a.Values[0].(asn1.ObjectIdentifier); ok && v.Equal(oidP256) {
				found = true
			}
		}
	}
	if !found {
		t.Fatalf("csrattrs does not ask for an EC P-256 key: %+v", attrs)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c.Username, c.Password = "est-std", g.Token(t, "est-std", "lab", time.Hour)
	cert, err := c.Enroll(ctx, estCSR(t, key))
	if err != nil {
		t.Fatalf("simpleenroll: %v", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) || cert.URIs[0].String() != "spiffe://test.fleetgate/device/est-std" {
		t.Fatalf("issued certificate: %v", cert.URIs)
	}

	re := estClient(g)
	re.Certificates, re.PrivateKey = []*x509.Certificate{cert}, key
	renewed, err := re.Reenroll(ctx, estCSR(t, key))
	if err != nil {
		t.Fatalf("simplereenroll: %v", err)
	}
	if renewed.SerialNumber.Cmp(cert.SerialNumber) == 0 || !key.PublicKey.Equal(renewed.PublicKey) {
		t.Fatal("simplereenroll did not issue a new certificate for the key")
	}
	d, err := g.Admin.Device(ctx, "est-std")
	if err != nil || d.Serial != fmtSerial(renewed) {
		t.Fatalf("registry does not hold the renewed certificate: %+v %v", d, err)
	}
}

// TestESTRefusalKeepsToken: a request EST refuses before redemption (wrong
// content type, malformed body, a key we do not issue for, another
// device's name) leaves the token usable.
func TestESTRefusalKeepsToken(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
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
	c := estClient(g)
	c.Username, c.Password = "est-keep", tok
	if _, err := c.Enroll(context.Background(), estCSR(t, key)); err != nil {
		t.Fatalf("the token was consumed by a refused request: %v", err)
	}
}
