package registry

import (
	"github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/fleet"
)

// EachCertificate calls fn with every certificate record (DER included),
// in serial order, in one read transaction; an error of fn stops it. The
// issuing-CA status (which devices still hold a CA's certificates) and the
// CRL of each issuing CA read through it.
func (r *Registry) EachCertificate(fn func(*fleet.Certificate) error) error {
	return r.db.View(func(txn *badger.Txn) error {
		return iterate(txn, pfxCert, fn)
	})
}
