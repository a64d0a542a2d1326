package cluster

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// casRetries is how often a compare-and-swap on a session record is
// tried again after another writer's revision came between its read and
// its write.
const casRetries = 5

// casBase is the first wait before a compare-and-swap is tried again; it
// doubles with each attempt.
const casBase = 5 * time.Millisecond

// casConflict tells whether err is a lost compare-and-swap: the key was
// created (Create) or rewritten (Update, Delete with LastRevision) since
// it was read.
func casConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists)
}

// casBackoff waits before attempt+1 of a compare-and-swap: casBase·2^attempt
// with full jitter (a random half to all of it), so that two nodes racing
// for one key do not retry in step. It returns false if ctx ends first:
// the retries stay within the operation's bound.
func casBackoff(ctx context.Context, attempt int) bool {
	d := casBase << min(attempt, 6)
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
