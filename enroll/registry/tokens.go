package registry

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
)

// HashTokenSecret is the stored form of a token secret.
func HashTokenSecret(secret []byte) []byte {
	h := sha256.Sum256(secret)
	return h[:]
}

// CreateToken stores t. A token for a revoked device is refused, and so is
// an ID already stored (ErrConflict).
func (r *Registry) CreateToken(t Token, actor string) error {
	err := r.updateRetry(func(txn txn) error {
		var d fleet.Device
		switch err := get(txn, pfxDevice+t.DeviceID, &d); {
		case err == nil:
			if d.State == fleet.StateRevoked {
				return fmt.Errorf("%w: %s", ErrDeviceRevoked, t.DeviceID)
			}
			// A device bound to a TPM enrolls by attestation only: a token
			// would let a software key take its identity.
			if d.EKFingerprint != "" {
				return fmt.Errorf("%w: %s is bound to a TPM EK; it enrolls by TPM attestation", ErrTPMBound, t.DeviceID)
			}
		case !errors.Is(err, ErrNotFound):
			return err
		}
		// An EK registered, or a revocation, on another node meanwhile
		// refuses the commit.
		txn.guard(pfxDevice + t.DeviceID)
		if err := r.clusterDeviceState(t.DeviceID); err != nil {
			return fmt.Errorf("%w: %s", err, t.DeviceID)
		}
		if taken, err := exists(txn, pfxToken+t.ID); err != nil {
			return err
		} else if taken {
			return fmt.Errorf("%w: token %s exists", ErrTokenExists, t.ID)
		}
		return put(txn, pfxToken+t.ID, &t)
	})
	r.Audit(AuditRecord{Actor: actor, Action: "token.create", DeviceID: t.DeviceID, Outcome: outcome(err), Reason: reason(err)})
	return err
}

// TokenRedemption is what RedeemToken hands the signing callback.
type TokenRedemption struct {
	Device fleet.Device
	Token  Token
}

// RedeemToken checks a token (constant-time comparison of the secret hash,
// expiry, single use, device binding, device state), calls sign, and then,
// in one transaction that checks the token again, marks it used, creates or
// updates the device and records the certificate. sign runs outside the
// registry's write lock (issue). Nothing is recorded if any step fails, and
// a token can be redeemed at most once even under concurrent requests: one
// redemption of a token signs at a time (a concurrent one is ErrConflict),
// and the commit refuses a token used meanwhile.
func (r *Registry) RedeemToken(tokenID string, secret []byte, deviceID string, sign func(TokenRedemption) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	return r.RedeemTokenAudited(tokenID, secret, deviceID, nil, sign)
}

// RedeemTokenAudited is RedeemToken that also writes audit, if not nil, as
// the audit record of the successful enrollment in the same transaction
// (with the certificate's serial and outcome ok). Nothing is written on
// failure: the caller audits the refusal.
func (r *Registry) RedeemTokenAudited(tokenID string, secret []byte, deviceID string, audit *AuditRecord, sign func(TokenRedemption) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	var t Token
	var dev fleet.Device
	return r.issue(issuance{
		audited: audit != nil,
		check: func(txn txn, now time.Time) error {
			t, dev = Token{}, fleet.Device{}
			if err := get(txn, pfxToken+tokenID, &t); err != nil {
				if errors.Is(err, ErrNotFound) {
					return ErrTokenUnknown
				}
				return err
			}
			if subtle.ConstantTimeCompare(t.Hash, HashTokenSecret(secret)) != 1 {
				return ErrTokenUnknown
			}
			if !t.UsedAt.IsZero() {
				return ErrTokenUsed
			}
			if !now.Before(t.ExpiresAt) {
				return ErrTokenExpired
			}
			if t.DeviceID != deviceID {
				return ErrTokenDevice
			}
			switch err := get(txn, pfxDevice+deviceID, &dev); {
			case errors.Is(err, ErrNotFound):
				dev = fleet.Device{ID: deviceID, Group: t.Group, CreatedAt: now}
			case err != nil:
				return err
			}
			switch dev.State {
			case fleet.StateRevoked:
				return ErrDeviceRevoked
			case fleet.StateSuspended:
				return ErrDeviceSuspended
			}
			if dev.EKFingerprint != "" { // registered after the token was minted
				return ErrTPMBound
			}
			if err := r.clusterDeviceState(deviceID); err != nil {
				return err
			}
			if _, taken := r.PrincipalRole(deviceID); taken {
				return fmt.Errorf("%w: %q is a service or operator name", ErrNameTaken, deviceID)
			}
			return nil
		},
		// Only a holder of the secret gets here: a guessed token ID cannot
		// keep the token busy.
		reserve: func() (func(), error) {
			if _, busy := r.redeeming.LoadOrStore(tokenID, struct{}{}); busy {
				return nil, fmt.Errorf("%w: token %s is being redeemed", ErrConflict, tokenID)
			}
			return func() { r.redeeming.Delete(tokenID) }, nil
		},
		sign: func() (*fleet.Certificate, error) { return sign(TokenRedemption{Device: dev, Token: t}) },
		commit: func(txn txn, c *fleet.Certificate, now time.Time) (*fleet.Device, error) {
			// The token's record is written at the revision the check
			// read: of concurrent redemptions on any nodes, one commits;
			// the others' checks, run again, find it used.
			t.UsedAt = now
			if err := put(txn, pfxToken+t.ID, &t); err != nil {
				return nil, err
			}
			if t.Group != "" {
				dev.Group = t.Group
			}
			dev.State = fleet.StateActive
			dev.AttestationMethod = fleet.MethodToken
			if err := deviceNameFree(txn, dev.ID); err != nil {
				return nil, err
			}
			if err := r.recordCert(txn, c, &dev, now); err != nil {
				return nil, err
			}
			return &dev, r.putIssuedAudit(txn, audit, c.Serial)
		},
	})
}
