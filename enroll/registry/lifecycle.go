package registry

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	badger "github.com/dgraph-io/badger/v4"
)

// ErrInvalidTransition: the device's state does not allow the change (a
// revoked device cannot be resumed or suspended).
var ErrInvalidTransition = errors.New("registry: invalid state transition")

// RevokeDevice revokes a device terminally, and every certificate it was
// issued, in one transaction. The in-memory index changes before the
// watchers are told and before RevokeDevice returns, so from that moment no
// handshake, CONNECT or ACL check admits the device. Revoking a revoked
// device is not an error and changes nothing.
func (r *Registry) RevokeDevice(id, reason, actor string) ([]string, error) {
	var serials []string
	now := r.now()
	var d Device
	err := r.update(func(txn *badger.Txn) error {
		serials = serials[:0]
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		if d.State == StateRevoked {
			return nil
		}
		d.State = StateRevoked
		d.UpdatedAt = now
		if err := put(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		ss, err := deviceSerials(txn, id)
		if err != nil {
			return err
		}
		for _, s := range ss {
			var c Certificate
			if err := get(txn, pfxCert+s, &c); err != nil {
				return err
			}
			if c.Revoked {
				continue
			}
			c.Revoked, c.RevokedAt, c.RevokeReason = true, now, reason
			if err := put(txn, pfxCert+s, &c); err != nil {
				return err
			}
			serials = append(serials, s)
		}
		return nil
	})
	r.Audit(AuditRecord{Actor: actor, Action: "device.revoke", DeviceID: id, Outcome: outcome(err), Reason: joinReason(reason, err), Serial: strings.Join(serials, ",")})
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.devices[id] = d.status()
	for _, s := range serials {
		st := r.certs[s]
		st.Revoked = true
		r.certs[s] = st
	}
	r.mu.Unlock()
	evs := []Event{{Kind: EventDeviceChanged, DeviceID: id, State: StateRevoked}}
	for _, s := range serials {
		evs = append(evs, Event{Kind: EventCertRevoked, Serial: s, DeviceID: id})
	}
	r.emit(evs...)
	return serials, nil
}

// RevokeCertificate revokes one certificate (any role).
func (r *Registry) RevokeCertificate(serial, reason, actor string) error {
	now := r.now()
	var c Certificate
	changed := false
	err := r.update(func(txn *badger.Txn) error {
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
	r.mu.Lock()
	st := r.certs[serial]
	st.Revoked = true
	r.certs[serial] = st
	r.mu.Unlock()
	r.emit(Event{Kind: EventCertRevoked, Serial: serial, DeviceID: deviceOf(&c)})
	return nil
}

func deviceOf(c *Certificate) string {
	if c.Role == "device" {
		return c.Name
	}
	return ""
}

// SetSuspended suspends (true) or resumes (false) a device. Suspension is
// reversible; a revoked device stays revoked.
func (r *Registry) SetSuspended(id string, suspend bool, reason, actor string) error {
	var d Device
	action := "device.resume"
	if suspend {
		action = "device.suspend"
	}
	err := r.update(func(txn *badger.Txn) error {
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		switch {
		case d.State == StateRevoked:
			return fmt.Errorf("%w: %s is revoked", ErrInvalidTransition, id)
		case suspend && d.State == StateSuspended, !suspend && d.State != StateSuspended:
			return nil // already there
		}
		if suspend {
			d.State = StateSuspended
		} else {
			d.State = StateActive
			if d.CurrentSerial == "" {
				d.State = StateRegistered
			}
		}
		d.UpdatedAt = r.now()
		return put(txn, pfxDevice+id, &d)
	})
	r.Audit(AuditRecord{Actor: actor, Action: action, DeviceID: id, Outcome: outcome(err), Reason: joinReason(reason, err)})
	if err != nil {
		return err
	}
	r.indexDevice(&d)
	return nil
}

// RecordRenewal records a renewed certificate for an active device, in one
// transaction that re-checks the device's state and that the certificate
// presented for renewal (oldSerial) is still valid.
func (r *Registry) RecordRenewal(id, oldSerial string, sign func(Device) (*Certificate, error)) (*Certificate, error) {
	var out *Certificate
	var d Device
	err := r.update(func(txn *badger.Txn) error {
		if err := get(txn, pfxDevice+id, &d); err != nil {
			return err
		}
		switch d.State {
		case StateRevoked:
			return ErrDeviceRevoked
		case StateSuspended:
			return ErrDeviceSuspended
		case StateActive:
		default:
			return fmt.Errorf("%w: device %s is %s", ErrInvalidTransition, id, d.State)
		}
		var old Certificate
		if err := get(txn, pfxCert+oldSerial, &old); err != nil {
			return err
		}
		if old.Revoked {
			return ErrDeviceRevoked
		}
		c, err := sign(d)
		if err != nil {
			return err
		}
		if err := r.recordCert(txn, c, &d, r.now()); err != nil {
			return err
		}
		out = c
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.indexCert(out, &d)
	return out, nil
}

// RevokedCertificates returns every revoked certificate that has not yet
// expired (expired ones may leave the CRL, RFC 5280 section 3.3), sorted by
// revocation time.
func (r *Registry) RevokedCertificates(now time.Time) ([]Certificate, error) {
	var out []Certificate
	err := r.db.View(func(txn *badger.Txn) error {
		return iterate(txn, pfxCert, func(c *Certificate) error {
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

// NextCRLNumber returns a new, strictly increasing CRL number.
func (r *Registry) NextCRLNumber() (uint64, error) {
	seq, err := r.db.GetSequence([]byte("seq/crl"), 1)
	if err != nil {
		return 0, err
	}
	defer seq.Release()
	n, err := seq.Next()
	return n + 1, err
}

func deviceSerials(txn *badger.Txn, id string) ([]string, error) {
	prefix := []byte("devcert/" + id + "/")
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
	defer it.Close()
	var out []string
	for it.Rewind(); it.Valid(); it.Next() {
		out = append(out, string(it.Item().Key()[len(prefix):]))
	}
	return out, nil
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
func (r *Registry) UpdateAttributes(id, group string, tags map[string]string, actor string) (*Device, error) {
	var d Device
	err := r.update(func(txn *badger.Txn) error {
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
	r.indexDevice(&d)
	return &d, nil
}

// CountExpiring counts unrevoked certificates that expire within d of now
// (and have not expired yet).
func (r *Registry) CountExpiring(now time.Time, d time.Duration) int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	n := 0
	limit := now.Add(d)
	for _, c := range r.certs {
		if !c.Revoked && c.NotAfter.After(now) && !c.NotAfter.After(limit) {
			n++
		}
	}
	return n
}
