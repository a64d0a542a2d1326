package registry

import (
	"errors"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// RecordCertificate records a certificate that does not belong to a device
// (service, operator).
func (r *Registry) RecordCertificate(c *fleet.Certificate) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if c.Role == identity.RoleDevice {
		return errors.New("registry: device certificates are recorded by enrollment")
	}
	if _, taken := r.DeviceStatus(c.Name); taken {
		return fmt.Errorf("%w: %q is a device ID", ErrNameTaken, c.Name)
	}
	if err := r.updateRetry(func(txn txn) error {
		if err := claimPrincipalName(txn, c.Name, c.Role); err != nil {
			return err
		}
		return r.recordCert(txn, c, nil, r.now())
	}); err != nil {
		return err
	}
	r.dir.Issued(c, nil)
	return nil
}

func (r *Registry) recordCert(txn txn, c *fleet.Certificate, dev *fleet.Device, now time.Time) error {
	if dup, err := exists(txn, pfxCert+c.Serial); err != nil {
		return err
	} else if dup {
		return fmt.Errorf("%w: %s", ErrDuplicateSerial, c.Serial)
	}
	c.IssuedAt = now
	if err := put(txn, pfxCert+c.Serial, c); err != nil {
		return err
	}
	if dev != nil {
		dev.CurrentSerial = c.Serial
		dev.NotAfter = c.NotAfter
		dev.UpdatedAt = now
		if err := put(txn, pfxDevice+dev.ID, dev); err != nil {
			return err
		}
		// Index certificates by device for revocation.
		if err := txn.set("devcert/"+dev.ID+"/"+c.Serial, nil); err != nil {
			return err
		}
	}
	return nil
}

// Certificate returns the record of serial.
func (r *Registry) Certificate(serial string) (*fleet.Certificate, error) {
	var c fleet.Certificate
	if err := r.view(func(txn txn) error { return get(txn, pfxCert+serial, &c) }); err != nil {
		return nil, err
	}
	return &c, nil
}
