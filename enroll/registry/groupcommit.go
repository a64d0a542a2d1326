package registry

import (
	"errors"
	"sync"

	"github.com/fleetgate/fleetgate/fleet"
)

// Group commit of issuances. Each issuance's write transaction is synced to
// disk before its certificate is returned; one at a time, the fleet's
// concurrent enrollments paid one disk sync (and one pass of badger's
// writer) each. Issuances that arrive while one is committing now wait and
// are committed together, in arrival order, in one transaction: each
// runs its second check and its commit as it would alone (it sees the
// writes of those before it in the batch, as it would have seen their
// commits), and the one sync covers them all. Nothing is returned before
// that sync: "a certificate is recorded before it is returned" holds for
// each. An issuance whose check refuses it writes nothing and gets its
// error; if a commit fails, or the batch is too big for one transaction or
// conflicts, each issuance of the batch is committed alone, as before. In a
// cluster (Options.Shared) a batch is one atomic batch of the store, so the
// same holds: all of it commits, or each is committed alone.

// maxIssueBatch bounds the issuances committed in one transaction.
const maxIssueBatch = 64

// errIssueBatch makes a batch transaction abort, so that each issuance is
// committed alone.
var errIssueBatch = errors.New("registry: commit the batch's issuances one by one")

// issueCommit is one signed issuance waiting to be committed.
type issueCommit struct {
	is issuance
	c  *fleet.Certificate
	// wake is closed when the commit is done, or when this request is to
	// lead the next batch (lead).
	wake chan struct{}
	lead bool
	err  error
}

// issueGroup is the queue of issuances waiting for a commit. The first to
// arrive when none is committing leads: it commits a batch of the
// waiting requests (itself first), then hands the lead to the first of
// those still waiting, and returns.
type issueGroup struct {
	mu      sync.Mutex
	pending []*issueCommit
	running bool
}

// commitIssue commits the signed certificate c of is (issue's third
// step), with the issuances waiting at the same time.
func (r *Registry) commitIssue(is issuance, c *fleet.Certificate) error {
	g := &r.issues
	q := &issueCommit{is: is, c: c, wake: make(chan struct{})}
	g.mu.Lock()
	g.pending = append(g.pending, q)
	if g.running {
		g.mu.Unlock()
		<-q.wake
		if !q.lead {
			return q.err
		}
		g.mu.Lock()
	}
	g.running = true
	n := min(len(g.pending), maxIssueBatch)
	batch := g.pending[:n:n]
	g.pending = g.pending[n:]
	g.mu.Unlock()

	r.commitBatch(batch)

	g.mu.Lock()
	if len(g.pending) > 0 {
		next := g.pending[0]
		next.lead = true
		close(next.wake)
	} else {
		g.running = false
		g.pending = nil
	}
	g.mu.Unlock()
	for _, b := range batch[1:] {
		close(b.wake)
	}
	return batch[0].err // batch[0] is q
}

// commitBatch commits batch under writeMu in one transaction (one request
// alone as issue always did) and updates the directory in commit order.
func (r *Registry) commitBatch(batch []*issueCommit) {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if r.commitBatchLocked(batch) != nil {
		// A failed commit, a transaction too big, a conflict: each alone.
		for _, q := range batch {
			r.commitBatchLocked([]*issueCommit{q})
		}
	}
}

// commitBatchLocked is commitBatch with writeMu held. It returns an error
// only for a batch of more than one whose transaction failed: nothing of
// it was committed, and each is to be committed alone.
func (r *Registry) commitBatchLocked(batch []*issueCommit) error {
	audited := false
	for _, q := range batch {
		audited = audited || q.is.audited
	}
	devs := make([]*fleet.Device, len(batch))
	// A conflict (a concurrent change, on any node in a cluster) runs
	// the checks and commits again (updateRetry), never the signatures.
	err := r.updateAudited(audited, func(txn txn) error {
		now := r.now()
		for i, q := range batch {
			q.err = nil
			if q.err = q.is.check(txn, now); q.err != nil {
				if len(batch) == 1 {
					return q.err
				}
				continue
			}
			var err error
			if devs[i], err = q.is.commit(txn, q.c, now); err != nil {
				if len(batch) == 1 {
					return err
				}
				return errIssueBatch
			}
		}
		return nil
	})
	if err != nil && len(batch) > 1 {
		return err
	}
	if err != nil {
		batch[0].err = err
		return nil
	}
	for i, q := range batch {
		if q.err != nil {
			continue
		}
		if q.is.revoked != nil && devs[i] != nil {
			if serials := q.is.revoked(); len(serials) > 0 {
				r.dir.Revoked(devs[i].ID, serials...)
			}
		}
		r.dir.Issued(q.c, devs[i])
	}
	return nil
}
