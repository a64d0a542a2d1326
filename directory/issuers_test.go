package directory_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Verify refuses a certificate whose issuing CA left the trusted set, with
// the reason unknown_ca, and accepts every issuer of the set.
func TestVerifyTrustedIssuers(t *testing.T) {
	res, err := ca.Init(filepath.Join(t.TempDir(), "d"), ca.InitOptions{TrustDomain: "td.test", Hosts: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	a := res.Authority
	d := directory.New()
	issue := func(name string) *fleet.Certificate {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		id, _ := identity.New(identity.RoleService, name)
		c, err := a.Issue(id, k.Public(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		rec := &fleet.Certificate{Serial: ca.SerialString(c.SerialNumber), Role: id.Role, Name: id.Name, NotAfter: c.NotAfter, DER: c.Raw}
		d.Issued(rec, nil)
		return rec
	}
	old := issue("old")
	first := a.Current()
	if _, err := a.Rotate(); err != nil {
		t.Fatal(err)
	}
	fresh := issue("fresh")
	check := func(rec *fleet.Certificate) error {
		_, _, err := d.Verify(mustParse(t, rec.DER), "td.test", time.Now())
		return err
	}
	if check(old) != nil || check(fresh) != nil {
		t.Fatal("refused without a trusted set")
	}
	d.SetTrustedIssuers(a.TrustedCerts())
	if err := check(old); err != nil {
		t.Fatalf("old CA during the overlap: %v", err)
	}
	if _, err := a.Retire(first.ID); err != nil {
		t.Fatal(err)
	}
	d.SetTrustedIssuers(a.TrustedCerts())
	err = check(old)
	if !errors.Is(err, directory.ErrIssuerNotTrusted) || directory.Reason(err) != fleet.ReasonUnknownCA {
		t.Fatalf("retired CA: %v", err)
	}
	if err := check(fresh); err != nil {
		t.Fatalf("new CA: %v", err)
	}
}

func mustParse(t *testing.T, der []byte) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
