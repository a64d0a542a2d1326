package directory

import (
	"errors"
	"fmt"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// The change feed (api.Feed) carries a directory to followers in other
// processes. Both ends are here: FeedSince encodes, on the side that owns
// the registry; ApplyFeed decodes, on the follower's.

// FeedSince is the feed's answer to a follower at version since of epoch:
// a snapshot when the follower needs one (first request, a new epoch, too
// far behind), else the current status of everything that changed after
// since. ready is false when nothing changed yet: f is then the empty
// answer at the current version, and wait is closed at the next change
// (a long poll waits on it and asks again).
func (d *Directory) FeedSince(epoch string, since uint64) (f api.Feed, ready bool, wait <-chan struct{}) {
	evs, version, ok, wait := d.Changes(epoch, since)
	if !ok {
		return d.snapshotFeed(), true, wait
	}
	return d.changesFeed(epoch, version, evs), len(evs) > 0, wait
}

func feedCert(serial string, c fleet.CertStatus) api.FeedCert {
	return api.FeedCert{Serial: serial, Role: string(c.Identity.Role), Name: c.Identity.Name, NotAfter: c.NotAfter, Revoked: c.Revoked}
}

func feedDevice(id string, d fleet.DeviceStatus) api.FeedDevice {
	return api.FeedDevice{ID: id, Group: d.Group, State: string(d.State), Tags: d.Tags, Method: d.Method}
}

func (d *Directory) snapshotFeed() api.Feed {
	epoch, version, certs, devices := d.Snapshot()
	f := api.Feed{Epoch: epoch, Version: version, Snapshot: true,
		Certs: make([]api.FeedCert, 0, len(certs)), Devices: make([]api.FeedDevice, 0, len(devices))}
	for s, c := range certs {
		f.Certs = append(f.Certs, feedCert(s, c))
	}
	for id, dev := range devices {
		f.Devices = append(f.Devices, feedDevice(id, dev))
	}
	return f
}

func (d *Directory) changesFeed(epoch string, version uint64, evs []fleet.Event) api.Feed {
	f := api.Feed{Epoch: epoch, Version: version}
	seenC, seenD := map[string]bool{}, map[string]bool{}
	for _, ev := range evs {
		if ev.Serial != "" && !seenC[ev.Serial] {
			seenC[ev.Serial] = true
			if c, ok := d.CertStatus(ev.Serial); ok {
				f.Certs = append(f.Certs, feedCert(ev.Serial, c))
			}
		}
		if ev.DeviceID != "" && !seenD[ev.DeviceID] {
			seenD[ev.DeviceID] = true
			if dev, ok := d.DeviceStatus(ev.DeviceID); ok {
				f.Devices = append(f.Devices, feedDevice(ev.DeviceID, dev))
			}
		}
	}
	return f
}

// ErrBadFeed: the feed answer is inconsistent.
var ErrBadFeed = errors.New("directory: malformed feed")

// ApplyFeed applies a feed answer to a follower's directory and tells its
// watchers of revocations and device state changes. A revocation is
// terminal: no answer, however stale, un-revokes a certificate or a device
// the follower knows revoked. A snapshot replaces the certificates: those
// it lacks are forgotten (nothing vouches for them any more), and watchers
// hear of them as revoked so that their sessions close. An answer with a
// malformed identity is refused whole (ErrBadFeed) and changes nothing.
func (d *Directory) ApplyFeed(f api.Feed) error {
	ids := make([]identity.Identity, len(f.Certs))
	for i, c := range f.Certs {
		id, err := identity.New(identity.Role(c.Role), c.Name)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadFeed, err)
		}
		ids[i] = id
	}
	var evs []fleet.Event
	d.mu.Lock()
	if f.Snapshot {
		seen := make(map[string]bool, len(f.Certs))
		for _, c := range f.Certs {
			seen[c.Serial] = true
		}
		for s := range d.certs {
			if !seen[s] {
				delete(d.certs, s)
				evs = append(evs, fleet.Event{Kind: fleet.EventCertRevoked, Serial: s})
			}
		}
	}
	for i, c := range f.Certs {
		id := ids[i]
		if id.Role != identity.RoleDevice {
			d.principals[id.Name] = id.Role
		}
		prev, had := d.certs[c.Serial]
		d.certs[c.Serial] = fleet.CertStatus{Identity: id, NotAfter: c.NotAfter, Revoked: c.Revoked || (had && prev.Revoked)}
		if c.Revoked && !(had && prev.Revoked) {
			evs = append(evs, fleet.Event{Kind: fleet.EventCertRevoked, Serial: c.Serial})
		}
	}
	for _, fd := range f.Devices {
		prev, had := d.devices[fd.ID]
		st := fleet.DeviceStatus{Group: fd.Group, State: fleet.DeviceState(fd.State), Tags: fd.Tags, Method: fd.Method}
		if had && prev.State == fleet.StateRevoked {
			st.State = fleet.StateRevoked // terminal, whatever a stale answer says
		}
		d.devices[fd.ID] = st
		if !had || prev.State != st.State {
			evs = append(evs, fleet.Event{Kind: fleet.EventDeviceChanged, DeviceID: fd.ID, State: st.State})
		}
	}
	d.gen.Add(1)
	d.mu.Unlock()
	d.emit(evs...)
	return nil
}
