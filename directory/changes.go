package directory

import (
	"crypto/rand"
	"encoding/hex"
	"sync"

	"github.com/fleetgate/fleetgate/fleet"
)

// changeLog numbers every change of the directory so that a follower (a
// broker running in another process) can follow them: it asks for the
// changes after the version it has, and gets a full snapshot when it has
// none, when the registry restarted (new epoch), or when it fell further
// behind than the log keeps.
type changeLog struct {
	mu      sync.Mutex
	epoch   string
	version uint64
	buf     []versioned // ring of the newest changes
	start   int
	notify  chan struct{} // closed and replaced on every change
}

type versioned struct {
	v  uint64
	ev fleet.Event
}

const changeLogSize = 8192

func newChangeLog() *changeLog {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return &changeLog{epoch: hex.EncodeToString(b), notify: make(chan struct{})}
}

func (l *changeLog) append(evs []fleet.Event) {
	l.mu.Lock()
	for _, ev := range evs {
		l.version++
		if len(l.buf) < changeLogSize {
			l.buf = append(l.buf, versioned{l.version, ev})
		} else {
			l.buf[l.start] = versioned{l.version, ev}
			l.start = (l.start + 1) % changeLogSize
		}
	}
	close(l.notify)
	l.notify = make(chan struct{})
	l.mu.Unlock()
}

// Changes returns the events after version since in epoch. ok is false when
// the caller needs a snapshot instead. wait is closed at the next change.
func (d *Directory) Changes(epoch string, since uint64) (evs []fleet.Event, version uint64, ok bool, wait <-chan struct{}) {
	l := d.changes
	l.mu.Lock()
	defer l.mu.Unlock()
	version, wait = l.version, l.notify
	if epoch != l.epoch || since > l.version {
		return nil, version, false, wait
	}
	if since == l.version {
		return nil, version, true, wait
	}
	oldest := l.version - uint64(len(l.buf)) + 1
	if since+1 < oldest {
		return nil, version, false, wait
	}
	for i := range l.buf {
		c := l.buf[(l.start+i)%len(l.buf)]
		if c.v > since {
			evs = append(evs, c.ev)
		}
	}
	return evs, version, true, wait
}

// Snapshot returns the whole in-memory index with the epoch and version it
// is at least as new as. Changes after version may already be included;
// replaying them is harmless because followers apply current values.
func (d *Directory) Snapshot() (epoch string, version uint64, certs map[string]fleet.CertStatus, devices map[string]fleet.DeviceStatus) {
	d.changes.mu.Lock()
	epoch, version = d.changes.epoch, d.changes.version
	d.changes.mu.Unlock()
	d.mu.RLock()
	defer d.mu.RUnlock()
	certs = make(map[string]fleet.CertStatus, len(d.certs))
	for k, v := range d.certs {
		certs[k] = v
	}
	devices = make(map[string]fleet.DeviceStatus, len(d.devices))
	for k, v := range d.devices {
		devices[k] = v
	}
	return
}
