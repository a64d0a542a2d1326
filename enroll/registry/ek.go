package registry

import (
	"errors"
	"fmt"
	"strings"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/fleet"
)

// pfxEK keys EK registrations by fingerprint: ek/<fingerprint>.
const pfxEK = "ek/"

// EK registration errors. Callers test them with errors.Is.
var (
	// ErrEKNotRegistered: no device is registered for this EK (allowlist
	// policy refuses it).
	ErrEKNotRegistered = errors.New("registry: EK not registered")
	// ErrEKRegistered: the EK is already registered for another device.
	ErrEKRegistered = errors.New("registry: EK already registered to another device")
	// ErrDeviceHasEK: the device is already bound to another EK (another
	// TPM). Moving a device ID to a new TPM is not supported: revoke the old
	// device and register the new TPM under a new ID.
	ErrDeviceHasEK = errors.New("registry: device already bound to another EK")
	// ErrEKDeviceMismatch: the EK is registered for a device other than the
	// one named in the request.
	ErrEKDeviceMismatch = errors.New("registry: EK registered for another device")
	// ErrDuplicateInImport: an import names the same EK or device twice.
	ErrDuplicateInImport = errors.New("registry: duplicate entry in import")
	// ErrImportTooLarge: an import does not fit in one transaction (badger's,
	// or a cluster's batch of at most maxKVOps writes);
	// it was not applied. Split the file into smaller imports.
	ErrImportTooLarge = errors.New("registry: import too large for one transaction")
)

// EKRecord is the registration of one TPM endorsement key at manufacturing.
type EKRecord struct {
	// Fingerprint is api.EKFingerprint of the EK public key: lowercase hex
	// SHA-256 of its DER SubjectPublicKeyInfo.
	Fingerprint  string    `json:"fingerprint"`
	DeviceID     string    `json:"device_id"`
	Group        string    `json:"group"`
	RegisteredAt time.Time `json:"registered_at"`
	RegisteredBy string    `json:"registered_by"`
	// Auto is set for EKs registered by their first enrollment under the
	// manufacturer policy, not by an operator.
	Auto bool `json:"auto,omitempty"`
}

// EKRegistration asks to register one EK for one device.
type EKRegistration struct {
	Fingerprint string
	DeviceID    string
	Group       string
}

// ImportProblem is one refused entry of an import: Index is its position in
// the slice given to ImportEKs.
type ImportProblem struct {
	Index    int
	DeviceID string
	Err      error
}

// ImportError lists every refused entry of an import; nothing was applied.
// errors.Is matches any entry's error.
type ImportError struct {
	Problems []ImportProblem
}

func (e *ImportError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "registry: import refused, %d bad entries:", len(e.Problems))
	for _, p := range e.Problems {
		fmt.Fprintf(&b, " [%d %s: %v]", p.Index, p.DeviceID, p.Err)
	}
	return b.String()
}

// Unwrap returns the entries' errors.
func (e *ImportError) Unwrap() []error {
	out := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		out[i] = p.Err
	}
	return out
}

// RegisterEK registers one EK for a device (manufacturing): the device is
// created in state registered if new. Registering the same EK for the same
// device again updates the group. Refused: an EK registered to another
// device (ErrEKRegistered), a device bound to another EK (ErrDeviceHasEK), a
// revoked device (ErrDeviceRevoked).
func (r *Registry) RegisterEK(reg EKRegistration, actor string) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if _, taken := r.PrincipalRole(reg.DeviceID); taken {
		return fmt.Errorf("%w: %q is a service or operator name", ErrNameTaken, reg.DeviceID)
	}
	var dev fleet.Device
	err := r.updateRetry(func(txn txn) error {
		d, err := r.registerEK(txn, reg, actor, r.now())
		dev = d
		return err
	})
	r.Audit(AuditRecord{Actor: actor, Action: "ek.register", DeviceID: reg.DeviceID, Outcome: outcome(err), Reason: reasonEK(reg, err)})
	if err != nil {
		return err
	}
	r.dir.DeviceChanged(&dev)
	return nil
}

func reasonEK(reg EKRegistration, err error) string {
	if err != nil {
		return err.Error()
	}
	return "ek " + reg.Fingerprint
}

// checkEK checks that reg can be applied in txn and returns the device
// record as it will be written.
func checkEK(txn txn, reg EKRegistration, now time.Time) (fleet.Device, error) {
	if reg.Fingerprint == "" || reg.DeviceID == "" {
		return fleet.Device{}, errors.New("registry: EK registration needs a fingerprint and a device ID")
	}
	var rec EKRecord
	switch err := get(txn, pfxEK+reg.Fingerprint, &rec); {
	case err == nil:
		if rec.DeviceID != reg.DeviceID {
			return fleet.Device{}, fmt.Errorf("%w: %s", ErrEKRegistered, rec.DeviceID)
		}
	case !errors.Is(err, ErrNotFound):
		return fleet.Device{}, err
	}
	if err := deviceNameFree(txn, reg.DeviceID); err != nil {
		return fleet.Device{}, err
	}
	var dev fleet.Device
	switch err := get(txn, pfxDevice+reg.DeviceID, &dev); {
	case errors.Is(err, ErrNotFound):
		dev = fleet.Device{ID: reg.DeviceID, State: fleet.StateRegistered, CreatedAt: now}
	case err != nil:
		return fleet.Device{}, err
	}
	if dev.State == fleet.StateRevoked {
		return fleet.Device{}, fmt.Errorf("%w: %s", ErrDeviceRevoked, reg.DeviceID)
	}
	if dev.EKFingerprint != "" && dev.EKFingerprint != reg.Fingerprint {
		return fleet.Device{}, fmt.Errorf("%w: %s", ErrDeviceHasEK, reg.DeviceID)
	}
	dev.EKFingerprint = reg.Fingerprint
	if reg.Group != "" {
		dev.Group = reg.Group
	}
	dev.UpdatedAt = now
	return dev, nil
}

func (r *Registry) registerEK(txn txn, reg EKRegistration, actor string, now time.Time) (fleet.Device, error) {
	dev, err := checkEK(txn, reg, now)
	if err != nil {
		return fleet.Device{}, err
	}
	rec := EKRecord{Fingerprint: reg.Fingerprint, DeviceID: reg.DeviceID, Group: dev.Group, RegisteredAt: now, RegisteredBy: actor}
	if err := put(txn, pfxEK+reg.Fingerprint, &rec); err != nil {
		return fleet.Device{}, err
	}
	if err := put(txn, pfxDevice+dev.ID, &dev); err != nil {
		return fleet.Device{}, err
	}
	return dev, nil
}

// CheckEKImport reports, without writing, every entry of regs that
// ImportEKs would refuse now (conflicts with the registry or within regs).
func (r *Registry) CheckEKImport(regs []EKRegistration) ([]ImportProblem, error) {
	var problems []ImportProblem
	err := r.view(func(txn txn) error {
		var err error
		problems, err = checkImport(txn, regs, r.now())
		return err
	})
	return problems, err
}

func checkImport(txn txn, regs []EKRegistration, now time.Time) ([]ImportProblem, error) {
	var problems []ImportProblem
	byEK := map[string]int{}
	byDevice := map[string]int{}
	for i, reg := range regs {
		if j, dup := byEK[reg.Fingerprint]; dup {
			problems = append(problems, ImportProblem{Index: i, DeviceID: reg.DeviceID, Err: fmt.Errorf("%w: EK also at entry %d", ErrDuplicateInImport, j)})
			continue
		}
		if j, dup := byDevice[reg.DeviceID]; dup {
			problems = append(problems, ImportProblem{Index: i, DeviceID: reg.DeviceID, Err: fmt.Errorf("%w: device also at entry %d", ErrDuplicateInImport, j)})
			continue
		}
		byEK[reg.Fingerprint], byDevice[reg.DeviceID] = i, i
		if _, err := checkEK(txn, reg, now); err != nil {
			if errors.Is(err, ErrEKRegistered) || errors.Is(err, ErrDeviceHasEK) || errors.Is(err, ErrDeviceRevoked) {
				problems = append(problems, ImportProblem{Index: i, DeviceID: reg.DeviceID, Err: err})
				continue
			}
			return nil, err
		}
	}
	return problems, nil
}

// ImportEKs registers many EKs in one transaction: all of them, or none.
// If any entry is refused, the returned *ImportError lists every refused
// entry (not only the first). An import too large for one badger
// transaction fails with ErrImportTooLarge and applies nothing.
func (r *Registry) ImportEKs(regs []EKRegistration, actor string) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	devs := make([]fleet.Device, 0, len(regs))
	var err error
	if r.kv != nil && 3*len(regs) > maxKVOps { // an EK, a device and its outbox record each
		err = fmt.Errorf("%w: %d writes", errTooBig, 3*len(regs))
	}
	if err == nil {
		err = r.updateRetry(func(txn txn) error {
			devs = devs[:0]
			now := r.now()
			problems, err := checkImport(txn, regs, now)
			if err != nil {
				return err
			}
			if len(problems) > 0 {
				return &ImportError{Problems: problems}
			}
			for _, reg := range regs {
				d, err := r.registerEK(txn, reg, actor, now)
				if err != nil {
					return err
				}
				devs = append(devs, d)
			}
			return nil
		})
	}
	if errors.Is(err, badger.ErrTxnTooBig) || errors.Is(err, errTooBig) {
		err = fmt.Errorf("%w (%d entries): %w", ErrImportTooLarge, len(regs), err)
	}
	r.Audit(AuditRecord{Actor: actor, Action: "ek.import", Outcome: outcome(err), Reason: importReason(len(regs), err)})
	if err != nil {
		return err
	}
	for i := range devs {
		r.dir.DeviceChanged(&devs[i])
	}
	return nil
}

func importReason(n int, err error) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("%d EKs registered", n)
}

// EK returns the registration of the EK with this fingerprint
// (ErrEKNotRegistered if none).
func (r *Registry) EK(fingerprint string) (*EKRecord, error) {
	var rec EKRecord
	err := r.view(func(txn txn) error { return get(txn, pfxEK+fingerprint, &rec) })
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", ErrEKNotRegistered, fingerprint)
	}
	if err != nil {
		return nil, err
	}
	return &rec, nil
}

// DeviceByEK returns the EK registration and the device it is registered
// for (ErrEKNotRegistered if none).
func (r *Registry) DeviceByEK(fingerprint string) (*EKRecord, *fleet.Device, error) {
	var rec EKRecord
	var dev fleet.Device
	err := r.view(func(txn txn) error {
		if err := get(txn, pfxEK+fingerprint, &rec); err != nil {
			if errors.Is(err, ErrNotFound) {
				return fmt.Errorf("%w: %s", ErrEKNotRegistered, fingerprint)
			}
			return err
		}
		return get(txn, pfxDevice+rec.DeviceID, &dev)
	})
	if err != nil {
		return nil, nil, err
	}
	return &rec, &dev, nil
}

// TPMRedemption is what RedeemTPM is asked to do, after the enrollment
// service verified the attestation.
type TPMRedemption struct {
	// EKFingerprint identifies the attested TPM.
	EKFingerprint string
	// DeviceID is the device the challenge was issued for.
	DeviceID string
	// AutoRegister registers an unknown EK for DeviceID with Group
	// (manufacturer policy). Without it an unknown EK is ErrEKNotRegistered.
	AutoRegister bool
	Group        string
	// Audit, if not nil, is the audit record of the successful enrollment:
	// it is written in the same transaction as the certificate, with the
	// certificate's serial and outcome ok. Nothing is written on failure
	// (the caller audits the refusal).
	Audit *AuditRecord
}

// RedeemTPM records a TPM-attested enrollment. It checks the EK
// registration (it must still name DeviceID) and the device state (revoked
// and suspended devices are refused: the device may have been revoked
// between the two round trips), calls sign outside the registry's write
// lock (issue), and then, in one transaction that checks all of it again,
// records the certificate (and an auto-registered EK) and marks the device
// active with attestation method tpm. Nothing is recorded if any step
// fails. With red.Audit, the audit record is part of that transaction.
//
// Re-enrollment policy: a device that already holds certificates may enroll
// again (e.g. after a factory reset of its TLS key) when the attested EK is
// the one registered for it and the device is neither revoked nor suspended.
// Its earlier TPM certificates are not revoked: they stay valid until they
// expire unless an operator revokes them. But the first TPM enrollment of a
// device that held certificates of another method (a bootstrap token: a
// software key) revokes those, in the same transaction: the attestation
// method is the device's, and a policy rule that requires attestation tpm
// must not apply to a key that never was in the TPM (supersedeNonTPM).
func (r *Registry) RedeemTPM(red TPMRedemption, sign func(fleet.Device) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	var rec EKRecord
	var dev fleet.Device
	var superseded []string
	autoNew := false
	c, err := r.issue(issuance{
		audited: red.Audit != nil,
		revoked: func() []string { return superseded },
		check: func(txn txn, now time.Time) error {
			rec, dev, autoNew = EKRecord{}, fleet.Device{}, false
			switch err := get(txn, pfxEK+red.EKFingerprint, &rec); {
			case errors.Is(err, ErrNotFound):
				if !red.AutoRegister {
					return fmt.Errorf("%w: %s", ErrEKNotRegistered, red.EKFingerprint)
				}
				rec = EKRecord{Fingerprint: red.EKFingerprint, DeviceID: red.DeviceID, Group: red.Group,
					RegisteredAt: now, RegisteredBy: "enroll", Auto: true}
				autoNew = true
			case err != nil:
				return err
			}
			if rec.DeviceID != red.DeviceID {
				return fmt.Errorf("%w: %s", ErrEKDeviceMismatch, rec.DeviceID)
			}
			switch err := get(txn, pfxDevice+red.DeviceID, &dev); {
			case errors.Is(err, ErrNotFound):
				dev = fleet.Device{ID: red.DeviceID, Group: rec.Group, CreatedAt: now}
			case err != nil:
				return err
			}
			switch dev.State {
			case fleet.StateRevoked:
				return ErrDeviceRevoked
			case fleet.StateSuspended:
				return ErrDeviceSuspended
			}
			if dev.EKFingerprint != "" && dev.EKFingerprint != red.EKFingerprint {
				return fmt.Errorf("%w: %s", ErrDeviceHasEK, red.DeviceID)
			}
			if dev.Group == "" {
				dev.Group = rec.Group
			}
			if dev.Group == "" {
				dev.Group = "default"
			}
			return nil
		},
		sign: func() (*fleet.Certificate, error) { return sign(dev) },
		commit: func(txn txn, c *fleet.Certificate, now time.Time) (*fleet.Device, error) {
			if autoNew {
				if err := put(txn, pfxEK+rec.Fingerprint, &rec); err != nil {
					return nil, err
				}
			}
			superseded = nil
			if dev.AttestationMethod != fleet.MethodTPM {
				var err error
				if superseded, err = supersedeNonTPM(txn, dev.ID, now); err != nil {
					return nil, err
				}
			}
			dev.State = fleet.StateActive
			dev.AttestationMethod = fleet.MethodTPM
			dev.EKFingerprint = red.EKFingerprint
			if err := r.recordCert(txn, c, &dev, now); err != nil {
				return nil, err
			}
			return &dev, r.putIssuedAudit(txn, red.Audit, c.Serial)
		},
	})
	if err == nil && len(superseded) > 0 {
		r.Audit(AuditRecord{Actor: "enroll", Action: "certificate.revoke", DeviceID: red.DeviceID, Outcome: OutcomeOK,
			Reason: reasonSupersededByTPM, Serial: strings.Join(superseded, ",")})
	}
	return c, err
}

// reasonSupersededByTPM is the revocation reason of a device's
// certificates of another method at its first TPM enrollment.
const reasonSupersededByTPM = "superseded: the device enrolled by TPM attestation"

// supersedeNonTPM marks revoked, in txn, the unexpired, unrevoked
// certificates of device id: called at its first TPM enrollment, when all
// of them are of another method (token).
func supersedeNonTPM(txn txn, id string, now time.Time) ([]string, error) {
	serials, err := deviceSerials(txn, id)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range serials {
		var c fleet.Certificate
		if err := get(txn, pfxCert+s, &c); err != nil {
			return nil, err
		}
		if c.Revoked || !now.Before(c.NotAfter) {
			continue
		}
		c.Revoked, c.RevokedAt, c.RevokeReason = true, now, reasonSupersededByTPM
		if err := put(txn, pfxCert+s, &c); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}
