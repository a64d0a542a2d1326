package server

import (
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// An operator without a role record has no role and may do nothing
// (registry.OperatorRole). Data directories made before init recorded its
// operator's role hold one such operator, the init operator, which used
// to count as admin; migrateInitOperatorRole gives it its admin record.

// grantInitOperator records name as admin and audits it.
func grantInitOperator(reg *registry.Registry, name, actor, why string) error {
	if err := reg.SetOperatorRole(registry.OperatorRecord{Name: name, Role: registry.OperatorAdmin, CreatedBy: actor}); err != nil {
		return err
	}
	reg.Audit(registry.AuditRecord{Actor: actor, Action: "operator.role", Outcome: registry.OutcomeOK,
		Reason: fmt.Sprintf("operator/%s role %s: %s", name, registry.OperatorAdmin, why)})
	return nil
}

// migrateInitOperatorRole gives the data directory's operator (the one
// init made, whose certificate is <data-dir>/operator.crt) an explicit
// admin record if it has no role record, and reports whether it did. It
// grants nothing when the record exists (idempotent), when the data
// directory has no operator certificate, or when that certificate is not
// in the registry, revoked (a removed operator stays removed) or expired.
func migrateInitOperatorRole(reg *registry.Registry, l Layout, now time.Time) (bool, error) {
	c, err := ca.ReadCertFile(l.OperatorCert())
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("operator role migration: %w", err)
	}
	rec, err := reg.Certificate(ca.SerialString(c.SerialNumber))
	if errors.Is(err, registry.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("operator role migration: %w", err)
	}
	if rec.Role != identity.RoleOperator || rec.Revoked || !now.Before(rec.NotAfter) {
		return false, nil
	}
	// A removed operator (RemoveOperator revokes every certificate of the
	// name) stays removed, even if operator.crt now holds a newer one.
	cs, err := reg.PrincipalCertificates(identity.RoleOperator, rec.Name)
	if err != nil {
		return false, fmt.Errorf("operator role migration: %w", err)
	}
	for _, c := range cs {
		if c.Revoked {
			return false, nil
		}
	}
	role, err := reg.OperatorRole(rec.Name)
	if err != nil || role != registry.OperatorNone {
		return false, err
	}
	if err := grantInitOperator(reg, rec.Name, "migration", "the init operator of a data directory made before roles were recorded"); err != nil {
		return false, fmt.Errorf("operator role migration: %w", err)
	}
	return true, nil
}

// migrateOperatorRole runs the migration where the registry is, and logs
// a grant.
func (s *Server) migrateOperatorRole() error {
	if s.reg == nil {
		return nil // a broker apart: the enrollment service migrates
	}
	if s.clu != nil {
		// A cluster node: the registry's records are in the shared
		// bucket, open later; the migration runs once the node's own
		// records are copied there. A failure is logged, not fatal: the
		// operator stays without a role (deny), and the next start
		// retries.
		s.clu.seeded = func() {
			if err := s.migrateOperatorRoleNow(); err != nil {
				s.log.Error("operator role migration not done; the init operator has no role until the next start", "err", err)
			}
		}
		return nil
	}
	return s.migrateOperatorRoleNow()
}

// migrateOperatorRoleNow is migrateOperatorRole on an open registry.
func (s *Server) migrateOperatorRoleNow() error {
	granted, err := migrateInitOperatorRole(s.reg, s.layout, time.Now())
	if granted {
		s.log.Info("operator role migration: the init operator got its explicit admin role")
	}
	return err
}
