package cluster

import (
	"context"
	"sync"
	"time"
)

// A node's graceful stop: the broker closes its connections, and each
// close writes the session's record (offline, or deleted) and may claim a
// will, both acknowledged by a JetStream majority. A node that lost its
// quorum waits out AckTimeout per write, one connection after another.
// Shutdown gives those writes one context (the server's deadline for the
// whole stop): every write from then on ends with it, and each write that
// fails from then on is remembered, for one summary line in the log
// (NotWritten) instead of one line per client.

// shutdownState is the router's stop deadline and what it cut off.
type shutdownState struct {
	mu sync.Mutex
	// base is the parent of every write's context (made on first use);
	// Shutdown cancels it when its own context ends, so that writes begun
	// before the stop end at its deadline too.
	base       context.Context
	cancel     context.CancelFunc
	stopping   bool
	notWritten []string // "client: what (error)"
}

func (d *shutdownState) baseLocked() context.Context {
	if d.base == nil {
		d.base, d.cancel = context.WithCancel(context.Background())
	}
	return d.base
}

// Shutdown bounds every cluster write of the router, under way or to come,
// by ctx. Call it before the broker closes its connections.
func (r *Router) Shutdown(ctx context.Context) {
	r.down.mu.Lock()
	r.down.baseLocked()
	r.down.stopping = true
	cancel := r.down.cancel
	r.down.mu.Unlock()
	context.AfterFunc(ctx, cancel)
}

// opCtx is the context of one cluster write: AckTimeout, and after
// Shutdown no later than the stop's deadline.
func (r *Router) opCtx() (context.Context, context.CancelFunc) {
	return r.opCtxWithin(r.cfg.AckTimeout)
}

// opCtxWithin is opCtx bounded by d instead of the acknowledgement timeout.
func (r *Router) opCtxWithin(d time.Duration) (context.Context, context.CancelFunc) {
	r.down.mu.Lock()
	base := r.down.baseLocked()
	r.down.mu.Unlock()
	return context.WithTimeout(base, d)
}

// unwritten records, once Shutdown ran, a write that failed; it reports
// whether it did (the caller then logs nothing itself).
func (r *Router) unwritten(client, what string, err error) bool {
	r.down.mu.Lock()
	defer r.down.mu.Unlock()
	if !r.down.stopping {
		return false
	}
	r.down.notWritten = append(r.down.notWritten, client+": "+what+" ("+err.Error()+")")
	return true
}

// NotWritten lists the writes that failed after Shutdown (the session
// records and wills of the connections closed by the stop).
func (r *Router) NotWritten() []string {
	r.down.mu.Lock()
	defer r.down.mu.Unlock()
	return append([]string(nil), r.down.notWritten...)
}

// DefaultShutdownTimeout is the stop's deadline for its cluster writes
// when the server sets none.
const DefaultShutdownTimeout = 5 * time.Second
