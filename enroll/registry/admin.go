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
	return r.update(func(txn txn) error { return put(txn, pfxOpRole+rec.Name, &rec) })
}

// liveAdmins returns the admin operators that hold an unrevoked,
// unexpired certificate.
func (r *Registry) liveAdmins(now time.Time) (map[string]bool, error) {
	ops, err := r.Principals(identity.RoleOperator)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for name, cs := range ops {
		role, err := r.OperatorRole(name)
		if err != nil {
			return nil, err
		}
		if role != OperatorAdmin {
			continue
		}
		for _, c := range cs {
			if !c.Revoked && now.Before(c.NotAfter) {
				out[name] = true
			}
		}
	}
	return out, nil
}

// RemoveOperator revokes every certificate of operator name and forgets
// its role. The last admin with a valid certificate is not removed
// (ErrLastAdmin). removeMu makes check and removal one step for
// concurrent removals.
func (r *Registry) RemoveOperator(name, reason, actor string) ([]string, error) {
	r.removeMu.Lock()
	defer r.removeMu.Unlock()
	admins, err := r.liveAdmins(r.now())
	if err != nil {
		return nil, err
	}
	if admins[name] && len(admins) == 1 {
		err := fmt.Errorf("%w: %s", ErrLastAdmin, name)
		r.Audit(AuditRecord{Actor: actor, Action: "operator.remove", Outcome: OutcomeDenied, Reason: joinReason(reason, err)})
		return nil, err
	}
	serials, err := r.RevokePrincipal(identity.RoleOperator, name, reason, actor)
	if err != nil {
		return serials, err
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	err = r.update(func(txn txn) error { return txn.del(pfxOpRole + name) })
	r.Audit(AuditRecord{Actor: actor, Action: "operator.remove", Outcome: outcome(err), Reason: joinReason("operator/"+name+": "+reason, err), Serial: strings.Join(serials, ",")})
	return serials, err
}
