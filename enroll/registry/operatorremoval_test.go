package registry

import (
	"errors"
	"testing"

	"github.com/fleetgate/fleetgate/identity"
)

// A removal interrupted after its commit (the node stopped, or the store
// stopped answering) never leaves the operator with no role record and
// every certificate valid: the state in which
// server.migrateInitOperatorRole, at the next start of a node, grants the
// init operator admin again ("no role record, a valid certificate, none
// revoked"). RemoveOperator revokes the certificates in the transaction
// that deletes the role. (Found by the security review; it failed when
// the role was deleted first and the certificates revoked later.)
func TestInterruptedOperatorRemovalLeavesNoRegrantableOperator(t *testing.T) {
	n := clusterNodes(t)
	addAdmin(t, n[0], "rev-init")
	addAdmin(t, n[0], "rev-other")

	crashAfterNextCommit(t)
	if _, err := n[0].RemoveOperator("rev-init", "compromised", "operator/rev-other"); !errors.Is(err, errCrash) {
		t.Fatalf("removal: %v, want the simulated stop after its first commit", err)
	}
	testHookAfterCommit.Store(nil)

	role, err := n[1].OperatorRole("rev-init")
	if err != nil {
		t.Fatal(err)
	}
	cs, err := n[1].PrincipalCertificates(identity.RoleOperator, "rev-init")
	if err != nil {
		t.Fatal(err)
	}
	revoked := 0
	for _, c := range cs {
		if c.Revoked {
			revoked++
		}
	}
	if role == OperatorNone && revoked == 0 {
		t.Fatalf("interrupted removal left operator rev-init with no role record and %d valid, unrevoked certificates: "+
			"server.migrateInitOperatorRole grants such an init operator admin at the next start", len(cs))
	}
}
