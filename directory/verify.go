package directory

import (
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Errors returned by Verify. Reason maps them to the refusal vocabulary.
var (
	ErrNoCert         = errors.New("no verified client certificate")
	ErrUnknownSerial  = errors.New("certificate serial was never issued by the registry")
	ErrRevoked        = errors.New("certificate revoked")
	ErrSuspended      = errors.New("device suspended")
	ErrUnknownDevice  = errors.New("device unknown to the registry")
	ErrExpired        = errors.New("certificate expired")
	ErrIdentityDiffer = errors.New("certificate identity differs from the registry record")
	// ErrStale: the directory's gate (SetGate) says its view may miss
	// revocations (a cluster node cut off from the others).
	ErrStale = errors.New("directory view is stale")
)

// Reason maps an error of Verify to its refusal reason; any other error
// (identity.FromCertificate's) is fleet.ReasonNoIdentity.
func Reason(err error) fleet.Reason {
	switch {
	case errors.Is(err, ErrNoCert):
		return fleet.ReasonNoCert
	case errors.Is(err, ErrUnknownSerial):
		return fleet.ReasonUnknownSerial
	case errors.Is(err, ErrRevoked):
		return fleet.ReasonRevoked
	case errors.Is(err, ErrSuspended):
		return fleet.ReasonSuspended
	case errors.Is(err, ErrUnknownDevice):
		return fleet.ReasonUnknownDevice
	case errors.Is(err, ErrExpired):
		return fleet.ReasonExpired
	case errors.Is(err, ErrIdentityDiffer):
		return fleet.ReasonIdentityDiffer
	case errors.Is(err, ErrStale):
		return fleet.ReasonDirectoryStale
	case errors.Is(err, ErrIssuerNotTrusted):
		return fleet.ReasonUnknownCA
	}
	return fleet.ReasonNoIdentity
}

// Verify is the one check of a client certificate against the directory,
// for a certificate that crypto/tls (or the caller) already verified
// against the issuing CA: chaining is necessary, not sufficient. The
// identity comes from the leaf's URI SAN in trustDomain; the serial must be
// one the registry issued, not revoked, to the same identity; the
// certificate must not have expired at now; and a device's certificate
// needs the device active. It returns the identity (when the leaf has one,
// also on refusal, for logging) and, on refusal, the reason and an error
// that Reason maps to it.
func (d *Directory) Verify(leaf *x509.Certificate, trustDomain string, now time.Time) (identity.Identity, fleet.Reason, error) {
	id, err := d.verify(leaf, trustDomain, now)
	if err != nil {
		return id, Reason(err), err
	}
	return id, "", nil
}

func (d *Directory) verify(leaf *x509.Certificate, trustDomain string, now time.Time) (identity.Identity, error) {
	if leaf == nil {
		return identity.Identity{}, ErrNoCert
	}
	id, err := identity.FromCertificate(leaf, trustDomain)
	if err != nil {
		return id, err
	}
	if g := d.gate.Load(); g != nil {
		if err := (*g)(); err != nil {
			return id, fmt.Errorf("%w: %v", ErrStale, err)
		}
	}
	st, ok := d.CertStatus(fleet.SerialString(leaf.SerialNumber))
	switch {
	case !ok:
		return id, ErrUnknownSerial
	case st.Revoked:
		return id, ErrRevoked
	case st.Identity != id:
		return id, ErrIdentityDiffer
	case !now.Before(leaf.NotAfter):
		return id, ErrExpired
	case !d.TrustedIssuer(leaf):
		return id, ErrIssuerNotTrusted
	}
	if id.Role == identity.RoleDevice {
		ds, ok := d.DeviceStatus(id.Name)
		switch {
		case !ok:
			return id, ErrUnknownDevice
		case ds.State == fleet.StateRevoked:
			return id, ErrRevoked
		case ds.State == fleet.StateSuspended:
			return id, ErrSuspended
		case ds.State != fleet.StateActive:
			return id, ErrUnknownDevice
		}
	}
	return id, nil
}

// SetGate installs a check that Verify runs before any other: while it
// returns an error, every certificate is refused with ErrStale (fail
// closed). A cluster node's feed (cluster/dirfeed) installs one that fails
// while its view of revocations is older than the bound.
func (d *Directory) SetGate(gate func() error) { d.gate.Store(&gate) }
