package registry

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
)

// ErrInvalidTransition: the device's state does not allow the change (a
// revoked device cannot be resumed or suspended).
var ErrInvalidTransition = errors.New("registry: invalid state transition")

// RevokeDevice revokes a device terminally, then every unexpired
// certificate it was issued. The device's state changes first, in a small
// transaction, and the directory with it before the watchers are told
// and before RevokeDevice returns: from that moment no handshake, CONNECT,
// ACL check, renewal or enrollment admits the device, whatever its
// certificates. Its certificates are then marked (for the CRL) in
// transactions of bounded size. Revoking a revoked device is not an error.
func (r *Registry) RevokeDevice(id, reason, actor string) ([]string, error) {
	if r.remoteDevice(id) { // enrolled through another cluster node
		return r.revokeRemote(id, reason, actor), nil
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	now := r.now()
	var d fleet.Device
	changed := false
	err := r.updateRetry(func(txn txn) error {
		changed, d = false, fleet.Device{}
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		if d.State == fleet.StateRevoked {
			return nil
		}
		d.State, d.UpdatedAt, changed = fleet.StateRevoked, now, true
		return put(txn, pfxDevice+id, &d)
	})
	if err == nil && changed {
		r.dir.DeviceChanged(&d)
	}
	var serials []string
	if err == nil {
		serials, err = r.revokeCerts(id, reason, now)
	}
	r.Audit(AuditRecord{Actor: actor, Action: "device.revoke", DeviceID: id, Outcome: outcome(err), Reason: joinReason(reason, err), Serial: strings.Join(serials, ",")})
	return serials, err
}

// revokeBatch bounds one transaction of RevokeDevice.
const revokeBatch = 256

// revokeCerts marks the unexpired, unrevoked certificates of a device
// revoked, a batch per transaction, and updates the directory (and so its
// watchers).
func (r *Registry) revokeCerts(id, reason string, now time.Time) ([]string, error) {
	var all []string
	if err := r.view(func(txn txn) error {
		var err error
		all, err = deviceSerials(txn, id)
		return err
	}); err != nil {
		return nil, err
	}
	var revoked []string
	for start := 0; start < len(all); start += revokeBatch {
		batch := all[start:min(start+revokeBatch, len(all))]
		var done []string
		err := r.updateRetry(func(txn txn) error {
			done = done[:0]
			for _, s := range batch {
				var c fleet.Certificate
				if err := get(txn, pfxCert+s, &c); err != nil {
					return err
				}
				if c.Revoked || !now.Before(c.NotAfter) {
					continue // expired certificates need no revocation
				}
				c.Revoked, c.RevokedAt, c.RevokeReason = true, now, reason
				if err := put(txn, pfxCert+s, &c); err != nil {
					return err
				}
				done = append(done, s)
			}
			return nil
		})
		if err != nil {
			return revoked, err
		}
		r.dir.Revoked(id, done...)
		revoked = append(revoked, done...)
	}
	return revoked, nil
}

// updateRetry is update, retried a few times on a transaction conflict.
// On a cluster's store a conflict can also be a concurrent batch still in
// flight (JetStream refuses an expectation on a subject a pending batch
// writes), so the retries back off, randomly, up to about a second in all.
func (r *Registry) updateRetry(fn func(txn) error) error {
	var err error
	for i := range 10 {
		if err = r.update(fn); !errors.Is(err, ErrConflict) {
			return err
		}
		if r.kv != nil {
			time.Sleep(time.Duration(1+rand.IntN(4*(i+1))) * 5 * time.Millisecond)
		}
	}
	return err
}

// RevokeCertificate revokes one certificate (any role).
func (r *Registry) RevokeCertificate(serial, reason, actor string) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	now := r.now()
	var c fleet.Certificate
	changed := false
	err := r.updateRetry(func(txn txn) error {
		changed, c = false, fleet.Certificate{}
		if err := get(txn, pfxCert+serial, &c); err != nil {
			return err
		}
		if c.Revoked {
			return nil
		}
		changed = true
		c.Revoked, c.RevokedAt, c.RevokeReason = true, now, reason
		return put(txn, pfxCert+serial, &c)
	})
	r.Audit(AuditRecord{Actor: actor, Action: "certificate.revoke", DeviceID: deviceOf(&c), Outcome: outcome(err), Reason: joinReason(reason, err), Serial: serial})
	if err != nil || !changed {
		return err
	}
	r.dir.Revoked(deviceOf(&c), serial)
	return nil
}

func deviceOf(c *fleet.Certificate) string {
	if c.Role == "device" {
		return c.Name
	}
	return ""
}

// SetSuspended suspends (true) or resumes (false) a device. Suspension is
// reversible; a revoked device stays revoked.
func (r *Registry) SetSuspended(id string, suspend bool, reason, actor string) error {
	if r.remoteDevice(id) { // enrolled through another cluster node
		return r.setSuspendedRemote(id, suspend, reason, actor)
	}
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	var d fleet.Device
	action := "device.resume"
	if suspend {
		action = "device.suspend"
	}
	err := r.updateRetry(func(txn txn) error {
		d = fleet.Device{}
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		switch {
		case d.State == fleet.StateRevoked:
			return fmt.Errorf("%w: %s is revoked", ErrInvalidTransition, id)
		case suspend && d.State == fleet.StateSuspended, !suspend && d.State != fleet.StateSuspended:
			return nil // already there
		}
		if suspend {
			d.State = fleet.StateSuspended
		} else {
			d.State = fleet.StateActive
			if d.CurrentSerial == "" {
				d.State = fleet.StateRegistered
			}
		}
		d.UpdatedAt = r.now()
		return put(txn, pfxDevice+id, &d)
	})
	r.Audit(AuditRecord{Actor: actor, Action: action, DeviceID: id, Outcome: outcome(err), Reason: joinReason(reason, err)})
	if err != nil {
		return err
	}
	r.dir.DeviceChanged(&d)
	return nil
}

// MaxLiveCertificates bounds the unexpired, unrevoked certificates a
// device may hold; renewal is refused past it.
const MaxLiveCertificates = 8

// RecordRenewal records a renewed certificate for an active device: it
// checks the device's state and that the certificate presented for renewal
// (oldSerial) is still valid and current, calls sign outside the registry's
// write lock (issue), and records the certificate in one transaction that
// checks all of it again.
func (r *Registry) RecordRenewal(id, oldSerial string, sign func(fleet.Device) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	var d fleet.Device
	return r.issue(issuance{
		check: func(txn txn, now time.Time) error {
			d = fleet.Device{}
			if err := get(txn, pfxDevice+id, &d); err != nil {
				return err
			}
			switch d.State {
			case fleet.StateRevoked:
				return ErrDeviceRevoked
			case fleet.StateSuspended:
				return ErrDeviceSuspended
			case fleet.StateActive:
			default:
				return fmt.Errorf("%w: device %s is %s", ErrInvalidTransition, id, d.State)
			}
			var old fleet.Certificate
			if err := get(txn, pfxCert+oldSerial, &old); err != nil {
				return err
			}
			if old.Revoked {
				return ErrDeviceRevoked
			}
			// A revocation of it (on any node) before the commit refuses
			// the renewal.
			txn.guard(pfxCert + oldSerial)
			// Only the current certificate renews: a leaked older sibling
			// cannot mint new ones, and renewals form one chain.
			if d.CurrentSerial != oldSerial {
				return fmt.Errorf("%w: only the device's current certificate can be renewed", ErrRenewalTooSoon)
			}
			// A device renewing in a loop cannot pile up certificates (each
			// one valid for the full lifetime) beyond a handful.
			serials, err := deviceSerials(txn, id)
			if err != nil {
				return err
			}
			live := 0
			for _, s := range serials {
				var c fleet.Certificate
				if get(txn, pfxCert+s, &c) == nil && !c.Revoked && now.Before(c.NotAfter) {
					live++
				}
			}
			if live >= MaxLiveCertificates {
				return fmt.Errorf("%w: the device already holds %d valid certificates", ErrRenewalTooSoon, live)
			}
			return nil
		},
		sign: func() (*fleet.Certificate, error) { return sign(d) },
		commit: func(txn txn, c *fleet.Certificate, now time.Time) (*fleet.Device, error) {
			return &d, r.recordCert(txn, c, &d, now)
		},
	})
}

// RevokedCertificates returns every revoked certificate that has not yet
// expired (expired ones may leave the CRL, RFC 5280 section 3.3), sorted by
// revocation time.
func (r *Registry) RevokedCertificates(now time.Time) ([]fleet.Certificate, error) {
	var out []fleet.Certificate
	err := r.view(func(txn txn) error {
		return iterate(txn, pfxCert, func(c *fleet.Certificate) error {
			if c.Revoked && now.Before(c.NotAfter) {
				c.DER = nil
				out = append(out, *c)
			}
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].RevokedAt.Before(out[j].RevokedAt) })
	return out, err
}

// NextCRLNumber returns a new, strictly increasing CRL number (in a
// cluster: one counter for every node, by compare-and-swap).
func (r *Registry) NextCRLNumber() (uint64, error) {
	if r.kv != nil {
		var n uint64
		err := r.updateRetry(func(txn txn) error {
			n = 0
			switch b, err := txn.getRaw(keyCRLSeq); {
			case err == nil:
				if n, err = strconv.ParseUint(string(b), 10, 64); err != nil {
					return fmt.Errorf("registry: CRL number %q: %w", b, err)
				}
			case !errors.Is(err, ErrNotFound):
				return err
			}
			n++
			return txn.set(keyCRLSeq, []byte(strconv.FormatUint(n, 10)))
		})
		return n, err
	}
	seq, err := r.db.GetSequence([]byte("seq/crl"), 1)
	if err != nil {
		return 0, err
	}
	defer seq.Release()
	n, err := seq.Next()
	return n + 1, err
}

// keyCRLSeq is a cluster's last CRL number (decimal).
const keyCRLSeq = "seq/crlnumber"

func deviceSerials(txn txn, id string) ([]string, error) {
	var out []string
	err := txn.scan("devcert/"+id+"/", func(rest string, _ []byte) error {
		out = append(out, rest)
		return nil
	})
	return out, err
}

func joinReason(reason string, err error) string {
	if err != nil {
		if reason == "" {
			return err.Error()
		}
		return reason + ": " + err.Error()
	}
	return reason
}

// UpdateAttributes sets a device's group (if not empty) and tags (if not
// nil; an empty map clears them). The broker applies them on the device's
// next check, without reconnect.
func (r *Registry) UpdateAttributes(id, group string, tags map[string]string, actor string) (*fleet.Device, error) {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	var d fleet.Device
	err := r.updateRetry(func(txn txn) error {
		d = fleet.Device{}
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		if group != "" {
			d.Group = group
		}
		if tags != nil {
			d.Tags = tags
		}
		d.UpdatedAt = r.now()
		return put(txn, pfxDevice+id, &d)
	})
	r.Audit(AuditRecord{Actor: actor, Action: "device.update", DeviceID: id, Outcome: outcome(err), Reason: joinReason(fmt.Sprintf("group=%q tags=%v", group, tags), err)})
	if err != nil {
		return nil, err
	}
	r.dir.DeviceChanged(&d)
	return &d, nil
}
