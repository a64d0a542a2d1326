// Package replica keeps, in a broker running apart from the enrollment
// service, an in-memory copy of the registry's certificate and device
// states, fed by the enrollment service's change feed (a long poll over
// mTLS). It answers the broker's checks like the registry does, and tells
// the broker of revocations and suspensions so that it closes sessions.
//
// Until the first snapshot has arrived the replica knows no certificate, so
// the broker refuses everyone (deny by default). After a lost connection it
// catches up from the version it has, or from a new snapshot if the
// enrollment service restarted or the gap is too old; revocations missed
// meanwhile close their sessions when they arrive.
package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// Replica is safe for concurrent use.
type Replica struct {
	base   string
	client *http.Client
	log    *slog.Logger
	wait   time.Duration

	mu      sync.RWMutex
	certs   map[string]registry.CertStatus
	devices map[string]registry.DeviceStatus
	names   map[string]identity.Role
	epoch   string
	version uint64
	synced  chan struct{}
	once    sync.Once
	lastOK  atomic.Int64 // unix nanoseconds of the last successful poll

	// Watchers (Watch) are told of revocations and state changes.
	registry.Watchers
}

// New returns a replica following the feed at baseURL with client (which
// must present an operator certificate).
func New(baseURL string, client *http.Client, log *slog.Logger) *Replica {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Replica{base: baseURL, client: client, log: log, wait: 20 * time.Second,
		certs: map[string]registry.CertStatus{}, devices: map[string]registry.DeviceStatus{}, names: map[string]identity.Role{}, synced: make(chan struct{})}
}

// StaleAfter is how long without a successful poll the replica is no
// longer fresh (a long poll lasts 20 s).
const StaleAfter = 45 * time.Second

// Fresh reports whether the replica has a snapshot and heard from the feed
// within StaleAfter. A broker whose replica is not fresh reports not ready
// (/readyz), so that a load balancer or an operator notices that
// revocations may not be arriving; it keeps serving with what it knows.
func (r *Replica) Fresh() bool {
	select {
	case <-r.synced:
	default:
		return false
	}
	return time.Since(time.Unix(0, r.lastOK.Load())) < StaleAfter
}

// Synced is closed once the first snapshot has been applied.
func (r *Replica) Synced() <-chan struct{} { return r.synced }

// CertStatus implements the broker's directory.
func (r *Replica) CertStatus(serial string) (registry.CertStatus, bool) {
	r.mu.RLock()
	s, ok := r.certs[serial]
	r.mu.RUnlock()
	return s, ok
}

// DeviceStatus implements the broker's directory.
func (r *Replica) DeviceStatus(id string) (registry.DeviceStatus, bool) {
	r.mu.RLock()
	s, ok := r.devices[id]
	r.mu.RUnlock()
	return s, ok
}

// PrincipalRole implements the broker's directory.
func (r *Replica) PrincipalRole(name string) (identity.Role, bool) {
	r.mu.RLock()
	role, ok := r.names[name]
	r.mu.RUnlock()
	return role, ok
}

// Run follows the feed until ctx ends.
func (r *Replica) Run(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for {
		err := r.poll(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			r.lastOK.Store(time.Now().UnixNano())
		}
		if err != nil {
			lvl := slog.LevelWarn
			if !r.Fresh() {
				lvl = slog.LevelError // revocations may be missed: alert
			}
			r.log.Log(ctx, lvl, "registry feed", "err", err, "retry_in", backoff, "fresh", r.Fresh())
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
	}
}

func (r *Replica) poll(ctx context.Context) error {
	r.mu.RLock()
	q := url.Values{"epoch": {r.epoch}, "since": {fmt.Sprint(r.version)}, "wait": {r.wait.String()}}
	r.mu.RUnlock()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.base+api.PathAdminFeed+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("feed: %s: %s", resp.Status, b)
	}
	var f api.Feed
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<30)).Decode(&f); err != nil {
		return fmt.Errorf("feed: decode: %w", err)
	}
	return r.Apply(f)
}

// ErrBadFeed: the feed answer is inconsistent.
var ErrBadFeed = errors.New("replica: malformed feed")

// Apply applies a feed answer and tells watchers of revocations and device
// state changes.
func (r *Replica) Apply(f api.Feed) error {
	var evs []registry.Event
	r.mu.Lock()
	if f.Snapshot {
		// Anything we knew that the snapshot lacks cannot be vouched for:
		// forget it (its sessions are closed, as for a revocation).
		seen := make(map[string]bool, len(f.Certs))
		for _, c := range f.Certs {
			seen[c.Serial] = true
		}
		for s := range r.certs {
			if !seen[s] {
				delete(r.certs, s)
				evs = append(evs, registry.Event{Kind: registry.EventCertRevoked, Serial: s})
			}
		}
	}
	for _, c := range f.Certs {
		id, err := identity.New(identity.Role(c.Role), c.Name)
		if err != nil {
			r.mu.Unlock()
			return fmt.Errorf("%w: %v", ErrBadFeed, err)
		}
		if id.Role != identity.RoleDevice {
			r.names[id.Name] = id.Role
		}
		prev, had := r.certs[c.Serial]
		r.certs[c.Serial] = registry.CertStatus{Identity: id, NotAfter: c.NotAfter, Revoked: c.Revoked || (had && prev.Revoked)}
		if c.Revoked && !(had && prev.Revoked) {
			evs = append(evs, registry.Event{Kind: registry.EventCertRevoked, Serial: c.Serial})
		}
	}
	for _, d := range f.Devices {
		prev, had := r.devices[d.ID]
		st := registry.DeviceStatus{Group: d.Group, State: registry.DeviceState(d.State), Tags: d.Tags}
		if had && prev.State == registry.StateRevoked {
			st.State = registry.StateRevoked // terminal, whatever a stale answer says
		}
		r.devices[d.ID] = st
		if !had || prev.State != st.State {
			evs = append(evs, registry.Event{Kind: registry.EventDeviceChanged, DeviceID: d.ID, State: st.State})
		}
	}
	r.epoch, r.version = f.Epoch, f.Version
	r.mu.Unlock()
	if f.Snapshot {
		r.once.Do(func() { close(r.synced) })
	}
	r.Notify(evs...)
	return nil
}
