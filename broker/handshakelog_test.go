package broker_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// rogueCert is a device-looking certificate from a CA the broker does not
// trust.
func rogueCert(t *testing.T) tls.Certificate {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(77), Subject: pkix.Name{CommonName: "Rogue Issuing CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, SubjectKeyId: []byte{0xab, 0xcd, 0xef}}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://test.fleetgate/device/rogue-1")
	leaf := &x509.Certificate{SerialNumber: big.NewInt(0x1234abcd), Subject: pkix.Name{CommonName: "rogue-1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// handshake runs a TLS handshake to the broker presenting cert (none if
// nil); the broker's verdict arrives with the first read.
func handshake(t *testing.T, g *testenv.Gateway, cert *tls.Certificate) error {
	t.Helper()
	cfg := &tls.Config{RootCAs: g.Roots(), ServerName: "localhost",
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if cert == nil {
				return &tls.Certificate{}, nil
			}
			return cert, nil
		}}
	c, err := tls.Dial("tcp", g.Addrs.MQTT, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}

// TestHandshakeRefusalNamesTheCertificate: a refused handshake's log line
// says which device and which CA: the presented certificate's subject,
// issuer, issuer key ID, serial and URI SAN; an identity only when there is
// one ("identity=/" never appears).
func TestHandshakeRefusalNamesTheCertificate(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	rogue := rogueCert(t)
	if err := handshake(t, g, &rogue); err == nil {
		t.Fatal("rogue CA's certificate admitted")
	}
	dev := certOf(t, g.EnrollDevice(t, "gone-1", "lab"))
	if _, err := g.Admin.DeviceAction(context.Background(), "gone-1", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	if err := handshake(t, g, &dev); err == nil {
		t.Fatal("revoked device admitted")
	}
	if err := handshake(t, g, nil); err == nil {
		t.Fatal("no certificate admitted")
	}
	devLeaf, _ := x509.ParseCertificate(dev.Certificate[0])
	line := func(reason string) string {
		var found string
		testenv.Eventually(t, 10*time.Second, func() error {
			for _, l := range strings.Split(g.Logs.String(), "\n") {
				if strings.Contains(l, `msg="tls handshake refused"`) && strings.Contains(l, "reason="+reason+" ") {
					found = l
					return nil
				}
			}
			return errors.New("no line with reason " + reason)
		})
		return found
	}
	l := line("unknown_ca")
	for _, want := range []string{`cert_subject="CN=rogue-1"`, `cert_issuer="CN=Rogue Issuing CA"`, "cert_issuer_key_id=abcdef",
		"cert_serial=1234abcd", "cert_uri=spiffe://test.fleetgate/device/rogue-1"} {
		if !strings.Contains(l, want) {
			t.Errorf("unknown_ca line lacks %s:\n%s", want, l)
		}
	}
	l = line("revoked")
	for _, want := range []string{"identity=device/gone-1", "cert_serial=" + devLeaf.SerialNumber.Text(16),
		"cert_uri=spiffe://test.fleetgate/device/gone-1", "cert_issuer="} {
		if !strings.Contains(l, want) {
			t.Errorf("revoked line lacks %s:\n%s", want, l)
		}
	}
	l = line("no_cert")
	if strings.Contains(l, "identity=") || strings.Contains(l, "cert_subject") {
		t.Errorf("no_cert line names an identity or a certificate:\n%s", l)
	}
	if strings.Contains(g.Logs.String(), "identity=/") {
		t.Error(`"identity=/" logged`)
	}
}
