package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
)

// Tokens in a cluster (Options.Shared). The shared store holds every
// token under tok.<id>; its record is the truth about use: a redemption
// commits only by a compare-and-swap of the record from the revision its
// check read to the record marked used, so of concurrent redemptions on
// any number of nodes exactly one issues. The node's badger keeps a copy
// (for the node's own listing); the copy is never trusted for use.

const sharedTokenKey = "tok."

// sharedTimeout bounds each call to the shared store.
const sharedTimeout = 5 * time.Second

// ErrSharedToken: the shared store did not answer (no quorum): nothing is
// issued.
var ErrSharedToken = errors.New("registry: cluster store unavailable")

func (r *Registry) putSharedToken(t *Token) error {
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
	defer cancel()
	if _, err := r.shared.Commit(ctx, kvtx.Op{Key: sharedTokenKey + t.ID, Value: b}); err != nil {
		if errors.Is(err, kvtx.ErrRevision) {
			return fmt.Errorf("%w: token %s exists", ErrConflict, t.ID)
		}
		return fmt.Errorf("%w: %v", ErrSharedToken, err)
	}
	return nil
}

// getSharedToken reads the token and the revision a claim must expect.
func (r *Registry) getSharedToken(id string) (Token, uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
	defer cancel()
	e, err := r.shared.Get(ctx, sharedTokenKey+id)
	switch {
	case errors.Is(err, kvtx.ErrNotFound), errors.Is(err, kvtx.ErrKey):
		return Token{}, 0, ErrTokenUnknown
	case err != nil:
		return Token{}, 0, fmt.Errorf("%w: %v", ErrSharedToken, err)
	}
	var t Token
	if err := json.Unmarshal(e.Value, &t); err != nil {
		return Token{}, 0, fmt.Errorf("registry: shared token %s: %w", id, err)
	}
	return t, e.Rev, nil
}

// claimSharedToken marks t used if its record is still at rev: the one
// place a token's single use across nodes is decided.
func (r *Registry) claimSharedToken(t *Token, rev uint64) error {
	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
	defer cancel()
	if _, err := r.shared.Commit(ctx, kvtx.Op{Key: sharedTokenKey + t.ID, Value: b, Expect: rev}); err != nil {
		if errors.Is(err, kvtx.ErrRevision) {
			return ErrTokenUsed
		}
		return fmt.Errorf("%w: %v", ErrSharedToken, err)
	}
	return nil
}

// clusterDeviceState refuses a device the cluster's directory knows
// revoked or suspended, though this node's badger may not know it (it was
// enrolled through another node).
func (r *Registry) clusterDeviceState(id string) error {
	if r.shared == nil {
		return nil
	}
	switch st, _ := r.dir.DeviceStatus(id); st.State {
	case fleet.StateRevoked:
		return ErrDeviceRevoked
	case fleet.StateSuspended:
		return ErrDeviceSuspended
	}
	return nil
}
