package registry

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Records the admin API lists and changes: tokens, the certificates of
// services and operators by name, and operator roles.
//
//	oprole/<name>   an operator's role (JSON OperatorRecord); an operator
//	                without one has no role and may do nothing

const pfxOpRole = "oprole/"

// Operator roles.
const (
	OperatorAdmin    = "admin"
	OperatorReadOnly = "read-only"
	// OperatorNone: no role record; such an operator is refused everything.
	OperatorNone = ""
)

// ErrLastAdmin: the change would leave no operator with the admin role.
var ErrLastAdmin = errors.New("registry: the last admin operator cannot be removed")

// Token states as the admin API lists them.
const (
	TokenUnused  = "unused"
	TokenUsed    = "used"
	TokenExpired = "expired"
	TokenRevoked = "revoked"
)

// TokenState returns t's state at now.
func TokenState(t Token, now time.Time) string {
	switch {
	case !t.RevokedAt.IsZero():
		return TokenRevoked
	case !t.UsedAt.IsZero():
		return TokenUsed
	case !now.Before(t.ExpiresAt):
		return TokenExpired
	}
	return TokenUnused
}

// Tokens returns every stored token, sorted by ID (secrets are hashes).
func (r *Registry) Tokens() ([]Token, error) {
	var out []Token
	err := r.view(func(txn txn) error {
		return iterate(txn, pfxToken, func(t *Token) error { t.Hash = nil; out = append(out, *t); return nil })
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// RevokeToken ends an unused token now: it can no longer be redeemed.
// Revoking a revoked token is not an error; a used one is
// ErrInvalidTransition; an unknown one ErrNotFound.
func (r *Registry) RevokeToken(id, actor string) (Token, error) {
	var t Token
	err := r.updateRetry(func(txn txn) error {
		if err := get(txn, pfxToken+id, &t); err != nil {
			return err
		}
		switch {
		case !t.RevokedAt.IsZero():
			return nil
		case !t.UsedAt.IsZero():
			return fmt.Errorf("%w: token %s was used", ErrInvalidTransition, id)
		}
		now := r.now()
		t.RevokedAt = now
		if now.Before(t.ExpiresAt) {
			t.ExpiresAt = now
		}
		return put(txn, pfxToken+id, &t)
	})
	r.Audit(AuditRecord{Actor: actor, Action: "token.revoke", DeviceID: t.DeviceID, Outcome: outcome(err), Reason: joinReason("token "+id, err)})
	t.Hash = nil
	return t, err
}

// PrincipalCertificates returns the certificates issued to the service or
// operator name (role), oldest first, without their DER.
func (r *Registry) PrincipalCertificates(role identity.Role, name string) ([]fleet.Certificate, error) {
	all, err := r.Principals(role)
	return all[name], err
}

// Principals returns the certificates of every name of role (service or
// operator), by name, oldest first, without their DER.
func (r *Registry) Principals(role identity.Role) (map[string][]fleet.Certificate, error) {
	out := map[string][]fleet.Certificate{}
	err := r.view(func(txn txn) error {
		return iterate(txn, pfxCert, func(c *fleet.Certificate) error {
			if c.Role == role {
				c.DER = nil
				out[c.Name] = append(out[c.Name], *c)
			}
			return nil
		})
	})
	for _, cs := range out {
		sort.Slice(cs, func(i, j int) bool { return cs[i].IssuedAt.Before(cs[j].IssuedAt) })
	}
	return out, err
}

// RevokePrincipal revokes every unexpired certificate of a service or
// operator name and returns their serials.
func (r *Registry) RevokePrincipal(role identity.Role, name, reason, actor string) ([]string, error) {
	cs, err := r.PrincipalCertificates(role, name)
	if err == nil && len(cs) == 0 {
		err = fmt.Errorf("%w: %s %s", ErrNotFound, role, name)
	}
	var serials []string
	now := r.now()
	for _, c := range cs {
		if err != nil {
			break
		}
		if c.Revoked || !now.Before(c.NotAfter) {
			continue
		}
		if err = r.RevokeCertificate(c.Serial, reason, actor); err == nil {
			serials = append(serials, c.Serial)
		}
	}
	return serials, err
}

// OperatorRecord is an operator's role.
type OperatorRecord struct {
	Name      string    `json:"name"`
	Role      string    `json:"role"`
	CreatedBy string    `json:"created_by,omitempty"`
	CreatedAt time.Time `json:"created_at,omitzero"`
}

// OperatorRole returns the role of operator name: its record's, else
// OperatorNone (no role: the operator may do nothing). Data directories
// made before init recorded its operator's role are migrated at start
// (server/operatorrole.go).
func (r *Registry) OperatorRole(name string) (string, error) {
	var rec OperatorRecord
	err := r.view(func(txn txn) error { return get(txn, pfxOpRole+name, &rec) })
	switch {
	case errors.Is(err, ErrNotFound):
		return OperatorNone, nil
	case err != nil:
		return "", err
	}
	return rec.Role, nil
}

// SetOperatorRole stores the role of operator name.
func (r *Registry) SetOperatorRole(rec OperatorRecord) error {
	if rec.Role != OperatorAdmin && rec.Role != OperatorReadOnly {
		return fmt.Errorf("registry: operator role %q", rec.Role)
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if rec.CreatedAt.IsZero() {
		rec.CreatedAt = r.now()
	}
	return r.updateRetry(func(txn txn) error {
		if err := touchRoles(txn, r.now()); err != nil {
			return err
		}
		return put(txn, pfxOpRole+rec.Name, &rec)
	})
}

// keyRoles is changed by every transaction that changes an operator's
// role, at the revision it read: two such transactions conflict, on one
// node or on any two, so the last-admin check of one sees the other's
// change (RemoveOperator).
const keyRoles = "oproles"

// touchRoles reads keyRoles (before any role: on a cluster's store a
// transaction's reads are not one snapshot) and writes it.
func touchRoles(txn txn, now time.Time) error {
	if _, err := txn.getRaw(keyRoles); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return txn.set(keyRoles, []byte(now.UTC().Format(time.RFC3339Nano)))
}

// liveAdmins returns the admin operators that hold an unrevoked,
// unexpired certificate, and the certificates of name.
func liveAdmins(txn txn, name string, now time.Time) (map[string]bool, []fleet.Certificate, error) {
	certs := map[string][]fleet.Certificate{}
	if err := iterate(txn, pfxCert, func(c *fleet.Certificate) error {
		if c.Role == identity.RoleOperator {
			certs[c.Name] = append(certs[c.Name], *c)
		}
		return nil
	}); err != nil {
		return nil, nil, err
	}
	out := map[string]bool{}
	for op, cs := range certs {
		var rec OperatorRecord
		switch err := get(txn, pfxOpRole+op, &rec); {
		case errors.Is(err, ErrNotFound):
			continue
		case err != nil:
			return nil, nil, err
		}
		if rec.Role != OperatorAdmin {
			continue
		}
		for _, c := range cs {
			if !c.Revoked && now.Before(c.NotAfter) {
				out[op] = true
			}
		}
	}
	return out, certs[name], nil
}

// removeRevokeMax bounds the certificates RemoveOperator revokes in its
// transaction (each write adds its outbox record on a cluster's store:
// 2 of the batch's maxKVOps). An operator holds a few; beyond the bound
// the rest are revoked after the commit (RevokePrincipal), and the
// removal already left a revoked certificate.
const removeRevokeMax = 256

// RemoveOperator forgets the role of operator name and revokes every
// unexpired certificate it holds, in one transaction: no interruption
// leaves the operator without a role and with no revoked certificate,
// the state in which the init-operator migration (server/operatorrole.go)
// would grant it admin again. The last admin with a valid certificate is
// not removed (ErrLastAdmin). The transaction changes keyRoles, so of
// concurrent removals on any nodes that would together leave no admin,
// one is refused. The directory (on a cluster's store through the
// commit's outbox) and the audit log follow the commit.
func (r *Registry) RemoveOperator(name, reason, actor string) ([]string, error) {
	r.removeMu.Lock()
	defer r.removeMu.Unlock()
	r.writeMu.Lock()
	var serials []string
	more := false
	err := r.updateRetry(func(txn txn) error {
		serials, more = serials[:0], false
		// keyRoles first: a role changed after this read changes it too,
		// so the commit conflicts; one changed before, the check sees.
		now := r.now()
		if err := touchRoles(txn, now); err != nil {
			return err
		}
		admins, certs, err := liveAdmins(txn, name, now)
		switch {
		case err != nil:
			return err
		case len(certs) == 0:
			return fmt.Errorf("%w: %s %s", ErrNotFound, identity.RoleOperator, name)
		case admins[name] && len(admins) == 1:
			return fmt.Errorf("%w: %s", ErrLastAdmin, name)
		}
		for _, c := range certs {
			if c.Revoked || !now.Before(c.NotAfter) {
				continue // expired certificates need no revocation
			}
			if len(serials) == removeRevokeMax {
				more = true
				break
			}
			c.Revoked, c.RevokedAt, c.RevokeReason = true, now, reason
			if err := put(txn, pfxCert+c.Serial, &c); err != nil {
				return err
			}
			serials = append(serials, c.Serial)
		}
		return txn.del(pfxOpRole + name)
	})
	if err == nil && len(serials) > 0 {
		r.dir.Revoked("", serials...)
	}
	r.writeMu.Unlock()
	if err == nil {
		for _, s := range serials {
			r.Audit(AuditRecord{Actor: actor, Action: "certificate.revoke", Outcome: OutcomeOK, Reason: reason, Serial: s})
		}
		if more {
			var rest []string
			rest, err = r.RevokePrincipal(identity.RoleOperator, name, reason, actor)
			serials = append(serials, rest...)
		}
	} else {
		serials = nil
	}
	r.Audit(AuditRecord{Actor: actor, Action: "operator.remove", Outcome: outcome(err), Reason: joinReason("operator/"+name+": "+reason, err), Serial: strings.Join(serials, ",")})
	return serials, err
}
