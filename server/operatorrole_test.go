package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// oldInit makes a data directory as init did before it recorded its
// operator's role: the operator certificate is recorded, its role not.
// It also records a certificate for an operator "ghost" that has no role
// either, and returns it.
func oldInit(t *testing.T) (string, tls.Certificate) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	res, err := ca.Init(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost", "127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.Open(server.Layout{Dir: dir}.RegistryDir(), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	op, err := identity.FromCertificate(res.Operator, "test.fleetgate")
	if err != nil {
		t.Fatal(err)
	}
	ghost := identity.Identity{Role: identity.RoleOperator, Name: "ghost"}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	gc, err := res.Authority.Issue(ghost, key.Public(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*fleet.Certificate{enroll.CertRecord(res.Operator, op), enroll.CertRecord(gc, ghost)} {
		if err := reg.RecordCertificate(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{op.Name, "ghost"} {
		if role, err := reg.OperatorRole(name); err != nil || role != registry.OperatorNone {
			t.Fatalf("old data directory: %s has role %q (%v)", name, role, err)
		}
	}
	return dir, tls.Certificate{Certificate: [][]byte{gc.Raw}, PrivateKey: key, Leaf: gc}
}

// TestOperatorRoleMigration: a data directory written before init
// recorded its operator's role still lets the init operator act after
// the start migrates it (once, audited); an operator without a role gets
// nothing, neither reads nor changes nor the registry feed, and a fresh
// init records the admin role.
func TestOperatorRoleMigration(t *testing.T) {
	dir, ghost := oldInit(t)
	ctx := context.Background()
	for run := 1; run <= 2; run++ {
		g := testenv.StartConfig(t, testenv.Config(t, testenv.Options{DataDir: dir}))
		if o, err := g.Admin.WhoAmI(ctx); err != nil || o.Role != api.OperatorAdmin {
			t.Fatalf("run %d: init operator after the migration: %+v %v", run, o, err)
		}
		if _, err := g.Admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: "after-migration", Group: "g"}); err != nil {
			t.Fatalf("run %d: the init operator cannot act: %v", run, err)
		}
		for _, c := range []struct{ method, path, body string }{
			{"GET", api.PathAdminDevices, ""},
			{"GET", api.PathAdminWhoAmI, ""},
			{"GET", api.PathAdminFeed, ""},
			{"POST", api.PathAdminTokens, `{"device_id":"x","group":"g"}`},
			{"POST", api.PathAdminOperators, `{"name":"sneaky","role":"admin"}`},
		} {
			if status, e := g.Call(t, ghost, c.method, c.path, c.body); status != http.StatusForbidden || e.Code != "operator_no_role" {
				t.Errorf("run %d: operator without a role: %s %s: %d %s", run, c.method, c.path, status, e.Code)
			}
		}
		recs, err := g.Admin.Audit(ctx, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		migrated, refused := 0, 0
		for _, r := range recs {
			if r.Actor == "migration" && r.Action == "operator.role" && r.Outcome == registry.OutcomeOK {
				migrated++
			}
			if r.Actor == "operator/ghost" && r.Reason == "operator_no_role" {
				refused++
			}
		}
		if migrated != 1 {
			t.Fatalf("run %d: %d audited migrations, want 1", run, migrated)
		}
		if refused == 0 {
			t.Fatalf("run %d: the refusals of an operator without a role are not audited", run)
		}
		g.Stop()
	}

	// A fresh init records the admin role itself: nothing to migrate.
	fresh := testenv.Init(t)
	reg, err := registry.Open(server.Layout{Dir: fresh}.RegistryDir(), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	c, err := ca.ReadCertFile(filepath.Join(fresh, ca.OperatorCertFile))
	if err != nil {
		t.Fatal(err)
	}
	if role, err := reg.OperatorRole(c.Subject.CommonName); err != nil || role != registry.OperatorAdmin {
		t.Fatalf("fresh init: operator role %q %v", role, err)
	}
}
