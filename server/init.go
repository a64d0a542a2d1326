package server

import (
	"path/filepath"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Init creates the PKI of dataDir and records the operator certificate in
// the registry (the broker and the admin API accept only certificates the
// registry knows). It never overwrites a CA: see ca.Init.
func Init(dataDir string, o ca.InitOptions) (*ca.InitResult, error) {
	res, err := ca.Init(dataDir, o)
	if err != nil {
		return nil, err
	}
	if _, err := InitClusterCA(dataDir); err != nil {
		return nil, err
	}
	reg, err := registry.Open(Layout{Dir: dataDir}.RegistryDir(), registry.Options{})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	op := res.Operator
	if err := reg.RecordCertificate(&fleet.Certificate{Serial: ca.SerialString(op.SerialNumber),
		Role: identity.RoleOperator, Name: op.Subject.CommonName, NotBefore: op.NotBefore, NotAfter: op.NotAfter, DER: op.Raw}); err != nil {
		return nil, err
	}
	if err := grantInitOperator(reg, op.Subject.CommonName, "init", "the first operator"); err != nil {
		return nil, err
	}
	reg.Audit(registry.AuditRecord{Actor: "init", Action: "init", Outcome: registry.OutcomeOK, Reason: "trust domain " + o.TrustDomain})
	return res, nil
}

// InitClusterCA creates the NATS cluster CA of dataDir (natssec.go) unless
// it has one; it reports whether it created it. Every node of a cluster
// needs the same one: it is copied with the data directory.
func InitClusterCA(dataDir string) (bool, error) {
	dir := filepath.Join(dataDir, ClusterCADir)
	if natsnode.CAExists(dir) {
		return false, nil
	}
	if _, err := natsnode.CreateCA(dir); err != nil {
		return false, err
	}
	return true, nil
}
