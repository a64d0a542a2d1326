package registry

import (
	"time"

	"github.com/fleetgate/fleetgate/fleet"
)

// issuance is one certificate issuance (token redemption, TPM enrollment,
// renewal) in the steps of Registry.issue.
type issuance struct {
	// check validates the request against the stored records at now and
	// keeps what sign and commit need. It runs twice: in a read-only
	// transaction before signing, and again in the write transaction, where
	// a change made meanwhile (a revocation, a used token) refuses it.
	check func(txn txn, now time.Time) error
	// reserve, if not nil, runs after the first check and before signing;
	// release is called once the issuance is over.
	reserve func() (release func(), err error)
	// sign returns the certificate to record. It runs with no lock held.
	sign func() (*fleet.Certificate, error)
	// commit writes the records of c in the write transaction, after the
	// second check, and returns the device to put in the directory (nil:
	// none).
	commit func(txn txn, c *fleet.Certificate, now time.Time) (*fleet.Device, error)
	// audited: commit appends an audit record (updateAudited).
	audited bool
	// revoked, if not nil, returns the serials commit revoked (of the
	// returned device): the directory learns of them before of the new
	// certificate.
	revoked func() []string
}

// issue runs is in three steps so that a slow signer (a CA key in an HSM or
// a TPM) never holds the registry's write lock: the fleet's other
// enrollments, revocations and suspensions go on while a signature is in
// progress. Validate (read-only transaction, no lock), sign (no lock), then
// commit under writeMu in one transaction that re-runs the check, and
// update the directory, all before returning: the certificate is recorded
// before it is returned, and nothing is recorded if any step fails. A
// certificate signed for a request that the second check refuses is
// discarded, never returned.
func (r *Registry) issue(is issuance) (*fleet.Certificate, error) {
	if err := r.view(func(txn txn) error { return is.check(txn, r.now()) }); err != nil {
		return nil, err
	}
	if is.reserve != nil {
		release, err := is.reserve()
		if err != nil {
			return nil, err
		}
		defer release()
	}
	c, err := is.sign()
	if err != nil {
		return nil, err
	}
	// Under writeMu, with the issuances committing at the same time
	// (groupcommit.go).
	if err := r.commitIssue(is, c); err != nil {
		return nil, err
	}
	return c, nil
}
