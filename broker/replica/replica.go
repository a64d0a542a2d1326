// Package replica feeds, in a broker running apart from the enrollment
// service, a directory.Directory from the enrollment service's change feed
// (a long poll over mTLS): the same in-memory view the registry feeds in a
// single process, so the broker's checks and its closing of sessions on
// revocations and suspensions work the same. The feed's codec is the
// directory's (directory.FeedSince, directory.ApplyFeed); this package is
// the HTTP follower and its freshness.
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
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/directory"
)

// Replica is safe for concurrent use.
type Replica struct {
	base   string
	client *http.Client
	log    *slog.Logger
	wait   time.Duration
	dir    *directory.Directory

	applyMu sync.Mutex // one Apply at a time, in feed order
	mu      sync.RWMutex
	epoch   string
	version uint64
	synced  chan struct{}
	once    sync.Once
	lastOK  atomic.Int64 // unix nanoseconds of the last successful poll
}

// New returns a replica following the feed at baseURL with client (which
// must present an operator certificate), feeding a new directory.
func New(baseURL string, client *http.Client, log *slog.Logger) *Replica {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Replica{base: baseURL, client: client, log: log, wait: 20 * time.Second,
		dir: directory.New(), synced: make(chan struct{})}
}

// Directory returns the directory the replica feeds: the broker reads it,
// and its watchers are told of revocations and state changes.
func (r *Replica) Directory() *directory.Directory { return r.dir }

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

// ErrBadFeed: the feed answer is inconsistent (directory.ErrBadFeed).
var ErrBadFeed = directory.ErrBadFeed

// Apply applies a feed answer to the directory (directory.ApplyFeed), which
// tells its watchers of revocations and device state changes, and records
// the epoch and version to ask from next.
func (r *Replica) Apply(f api.Feed) error {
	r.applyMu.Lock()
	defer r.applyMu.Unlock()
	if err := r.dir.ApplyFeed(f); err != nil {
		return err
	}
	r.mu.Lock()
	r.epoch, r.version = f.Epoch, f.Version
	r.mu.Unlock()
	if f.Snapshot {
		r.once.Do(func() { close(r.synced) })
	}
	return nil
}
