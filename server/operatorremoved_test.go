package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// TestRemovedInitOperatorStaysRemoved: once the init operator is removed
// (its certificates revoked, its role forgotten), neither `server-cert
// renew` nor the start's role migration brings it back: renew refuses to
// issue it a certificate, and the migration grants nothing to an operator
// with a revoked certificate, whatever operator.crt holds now.
func TestRemovedInitOperatorStaysRemoved(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	res, err := Init(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	initName := res.Operator.Subject.CommonName
	reg, err := registry.Open(Layout{Dir: dir}.RegistryDir(), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// a second admin, so that the init operator may be removed
	bob := identity.Identity{Role: identity.RoleOperator, Name: "bob"}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	bc, err := res.Authority.Issue(bob, key.Public(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.RecordCertificate(&fleet.Certificate{Serial: ca.SerialString(bc.SerialNumber), Role: identity.RoleOperator,
		Name: "bob", NotBefore: bc.NotBefore, NotAfter: bc.NotAfter, DER: bc.Raw}); err != nil {
		t.Fatal(err)
	}
	if err := reg.SetOperatorRole(registry.OperatorRecord{Name: "bob", Role: registry.OperatorAdmin}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.RemoveOperator(initName, "left the company", "operator/bob"); err != nil {
		t.Fatal(err)
	}
	reg.Close()

	if _, err := RenewOperatorCert(dir, ""); err == nil {
		t.Error("server-cert renew issued a certificate to the removed init operator")
	}
	// Even with a valid certificate of that name in operator.crt and the
	// registry (a renewal made by an older binary), the migration grants
	// nothing.
	reg, err = registry.Open(Layout{Dir: dir}.RegistryDir(), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	id := identity.Identity{Role: identity.RoleOperator, Name: initName}
	nk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	nc, err := res.Authority.Issue(id, nk.Public(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.RecordCertificate(&fleet.Certificate{Serial: ca.SerialString(nc.SerialNumber), Role: identity.RoleOperator,
		Name: initName, NotBefore: nc.NotBefore, NotAfter: nc.NotAfter, DER: nc.Raw}); err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteFileAtomic(Layout{Dir: dir}.OperatorCert(), ca.CertPEM(nc), 0o644); err != nil {
		t.Fatal(err)
	}
	granted, err := migrateInitOperatorRole(reg, Layout{Dir: dir}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if role, _ := reg.OperatorRole(initName); granted || role != registry.OperatorNone {
		t.Fatalf("the removed init operator got role %q back at start (granted %v)", role, granted)
	}
}
