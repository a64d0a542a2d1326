// Package directory is fleetgate's in-memory view of its devices and
// certificates: which serials were issued to whom and whether they are
// revoked, each device's group, tags and state, and the names of services
// and operators. Every check on a hot path (a TLS handshake, a CONNECT, an
// ACL decision, an operator API call) answers from it without touching
// disk; Verify is the one check of a client certificate against it.
//
// A Directory is fed, in commit order, either by the registry (enroll's
// badger store, in the process that owns it) or by a follower of the
// registry's change feed (a broker in its own process, broker/replica).
// Either way the index exists once per process. Watchers are told of every
// change after the view has it; the change log numbers the changes so that
// a follower can ask for those after the version it has (feed.go).
package directory

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Directory is safe for concurrent use. Its writers (the registry, a feed
// follower) must call the write methods in commit order, one at a time.
type Directory struct {
	mu      sync.RWMutex
	certs   map[string]fleet.CertStatus
	devices map[string]fleet.DeviceStatus
	// principals maps service and operator names to their role.
	principals map[string]identity.Role
	// Watchers are told of every change (Watch), after the view has it.
	Watchers
	changes *changeLog
	// gate, if set, refuses every Verify while it fails (SetGate).
	gate atomic.Pointer[func() error]
	// issuers are the trusted issuing CAs (issuers.go).
	issuers trustedIssuers
	// gen counts the writes to certs, devices and principals (made under
	// mu): an answer derived from the view stays valid while it is
	// unchanged (the broker caches ACL decisions on it).
	gen atomic.Uint64
}

// Generation returns the number of writes to the view so far. Read it
// before the reads a cached answer derives from: the answer is current
// while Generation still returns the same number.
func (d *Directory) Generation() uint64 { return d.gen.Load() }

// New returns an empty directory: it vouches for no certificate.
func New() *Directory {
	return &Directory{certs: map[string]fleet.CertStatus{}, devices: map[string]fleet.DeviceStatus{},
		principals: map[string]identity.Role{}, changes: newChangeLog()}
}

// ---- reads ----

// CertStatus returns the view of a serial. ok is false if the registry
// never issued it.
func (d *Directory) CertStatus(serial string) (fleet.CertStatus, bool) {
	d.mu.RLock()
	s, ok := d.certs[serial]
	d.mu.RUnlock()
	return s, ok
}

// DeviceStatus returns the view of a device.
func (d *Directory) DeviceStatus(id string) (fleet.DeviceStatus, bool) {
	d.mu.RLock()
	s, ok := d.devices[id]
	d.mu.RUnlock()
	return s, ok
}

// PrincipalRole returns the role of a service or operator name that the
// registry issued a certificate to. Names share one namespace with device
// IDs: they are MQTT client IDs.
func (d *Directory) PrincipalRole(name string) (identity.Role, bool) {
	d.mu.RLock()
	role, ok := d.principals[name]
	d.mu.RUnlock()
	return role, ok
}

// CountExpiring counts unrevoked certificates that expire within dur of
// now (and have not expired yet).
func (d *Directory) CountExpiring(now time.Time, dur time.Duration) int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	n := 0
	limit := now.Add(dur)
	for _, c := range d.certs {
		if !c.Revoked && c.NotAfter.After(now) && !c.NotAfter.After(limit) {
			n++
		}
	}
	return n
}

// ---- writes of the registry ----

// Load adds a stored certificate to the view without telling anyone (the
// registry loading its index at start).
func (d *Directory) Load(c *fleet.Certificate) {
	d.mu.Lock()
	d.putCert(c)
	d.gen.Add(1)
	d.mu.Unlock()
}

// LoadDevice adds a stored device to the view without telling anyone.
func (d *Directory) LoadDevice(dev *fleet.Device) {
	d.mu.Lock()
	d.devices[dev.ID] = dev.Status()
	d.gen.Add(1)
	d.mu.Unlock()
}

func (d *Directory) putCert(c *fleet.Certificate) {
	d.certs[c.Serial] = c.Status()
	if c.Role != identity.RoleDevice {
		d.principals[c.Name] = c.Role
	}
}

// Issued records a committed certificate and, for a device's, the device
// record committed with it, then tells the watchers.
func (d *Directory) Issued(c *fleet.Certificate, dev *fleet.Device) {
	d.mu.Lock()
	d.putCert(c)
	if dev != nil {
		d.devices[dev.ID] = dev.Status()
	}
	d.gen.Add(1)
	d.mu.Unlock()
	evs := []fleet.Event{{Kind: fleet.EventCertIssued, Serial: c.Serial}}
	if dev != nil {
		evs = append(evs, fleet.Event{Kind: fleet.EventDeviceChanged, DeviceID: dev.ID, State: dev.State})
	}
	d.emit(evs...)
}

// DeviceChanged records a committed change of a device (state, group,
// tags), then tells the watchers.
func (d *Directory) DeviceChanged(dev *fleet.Device) {
	d.mu.Lock()
	d.devices[dev.ID] = dev.Status()
	d.gen.Add(1)
	d.mu.Unlock()
	d.emit(fleet.Event{Kind: fleet.EventDeviceChanged, DeviceID: dev.ID, State: dev.State})
}

// Revoked records committed revocations of certificates (of deviceID, or
// of no device: ""), then tells the watchers.
func (d *Directory) Revoked(deviceID string, serials ...string) {
	d.mu.Lock()
	for _, s := range serials {
		st := d.certs[s]
		st.Revoked = true
		d.certs[s] = st
	}
	d.gen.Add(1)
	d.mu.Unlock()
	evs := make([]fleet.Event, 0, len(serials))
	for _, s := range serials {
		evs = append(evs, fleet.Event{Kind: fleet.EventCertRevoked, Serial: s, DeviceID: deviceID})
	}
	d.emit(evs...)
}

func (d *Directory) emit(evs ...fleet.Event) {
	d.changes.append(evs)
	d.Notify(evs...)
}
