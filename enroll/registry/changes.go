package registry

import (
	"crypto/rand"
	"encoding/hex"
	"sync"
)

// changeLog numbers every committed change so that a replica (a broker
// running in another process) can follow them: it asks for the changes
// after the version it has, and gets a full snapshot when it has none, when
// the registry restarted (new epoch), or when it fell further behind than
// the log keeps.
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
	ev Event
}

const changeLogSize = 8192

func newChangeLog() *changeLog {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return &changeLog{epoch: hex.EncodeToString(b), notify: make(chan struct{})}
}

func (l *changeLog) append(evs []Event) {
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
func (r *Registry) Changes(epoch string, since uint64) (evs []Event, version uint64, ok bool, wait <-chan struct{}) {
	l := r.changes
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
// replaying them is harmless because replicas apply current values.
func (r *Registry) Snapshot() (epoch string, version uint64, certs map[string]CertStatus, devices map[string]DeviceStatus) {
	r.changes.mu.Lock()
	epoch, version = r.changes.epoch, r.changes.version
	r.changes.mu.Unlock()
	r.mu.RLock()
	defer r.mu.RUnlock()
	certs = make(map[string]CertStatus, len(r.certs))
	for k, v := range r.certs {
		certs[k] = v
	}
	devices = make(map[string]DeviceStatus, len(r.devices))
	for k, v := range r.devices {
		devices[k] = v
	}
	return
}
