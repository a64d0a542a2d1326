package registry

import (
	"github.com/fleetgate/fleetgate/fleet"
)

// EachCertificate calls fn with every certificate record (DER included),
// in serial order, in one read transaction; an error of fn stops it. The
// issuing-CA status (which devices still hold a CA's certificates) and the
// CRL of each issuing CA read through it.
func (r *Registry) EachCertificate(fn func(*fleet.Certificate) error) error {
	return r.view(func(txn txn) error {
		return iterate(txn, pfxCert, fn)
	})
}
