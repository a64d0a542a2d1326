package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// An operator's role is the cluster's, not one node's: an operator added
// through node 1 may read through node 2 (its certificate is known there),
// and a read-only operator may change nothing through any node. Operator
// role records live in each node's local badger (enroll/registry/admin.go,
// pfxOpRole), so node 2 knows the certificate but not the role: it
// refuses the operator everything (403 operator_no_role), and a demotion
// or removal of the role through one node would not reach the others.
//
// A review finding; the role records are now in the shared registry.
func TestClusterOperatorRoleOnEveryNode(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	ctx := context.Background()
	r, err := c.Nodes[0].Admin.AddOperator(ctx, api.OperatorAddRequest{Name: "carol", Role: api.OperatorReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	carol, err := tls.X509KeyPair([]byte(r.CertificateChainPEM), []byte(r.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	for i, g := range c.Nodes {
		testenv.Eventually(t, 10*time.Second, func() error {
			if status, e := g.Call(t, carol, "GET", api.PathAdminDevices, ""); status != http.StatusOK {
				return fmt.Errorf("node %d: a read-only operator reads the devices: %d %s", i+1, status, e.Code)
			}
			return nil
		})
		if status, e := g.Call(t, carol, "POST", api.PathAdminTokens, `{"device_id":"x","group":"g"}`); status != http.StatusForbidden || e.Code != "operator_read_only" {
			t.Errorf("node %d: read-only operator creates a token: %d %s", i+1, status, e.Code)
		}
	}
}
