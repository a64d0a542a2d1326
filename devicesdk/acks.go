package devicesdk

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// What "acknowledged" means here. paho v3 completes a QoS 1/2 publish
// token WITHOUT error when it resends the message after an automatic
// reconnect (client.resume: claimID completes the token it replaces), before
// the broker has acknowledged anything (paho.mqtt.golang issue 563, open;
// its README says token.Wait may "return successfully before a message has
// been delivered"). A device that drops a reading once Publish returned nil
// would lose it whenever a connection broke with the reading in flight.
//
// The broker's acknowledgement is visible in paho's store instead: a QoS 1/2
// publish is kept under "o.<packet id>" from Publish until its PUBACK (QoS
// 2: PUBCOMP) arrives, and only then deleted (persistInbound), also across
// reconnects. AckStore is paho's memory store with that deletion made
// observable; Wait returns nil only after it.

// ErrNotAcknowledged: the client was closed, or its session cleared,
// before the broker acknowledged the message (it may or may not have it).
var ErrNotAcknowledged = errors.New("devicesdk: not acknowledged by the broker")

// AckStore is an in-memory paho.Store that tells when the broker
// acknowledged an outbound QoS 1/2 message. Give it to
// paho.ClientOptions.SetStore, one per client.
type AckStore struct {
	paho.Store
	mu      sync.Mutex
	pending map[string]chan error // outbound key → told the outcome once
	// failed keeps the outcome of messages that were pending when the
	// store was reset or closed, until their packet ID is used again: a
	// later Wait or Acked must not take "nothing pending" for an
	// acknowledgement (paho's own token of such a message may have
	// completed without error on a resend).
	failed map[string]error
}

// NewAckStore returns an AckStore over paho's memory store.
func NewAckStore() *AckStore {
	return &AckStore{Store: paho.NewMemoryStore(), pending: map[string]chan error{}, failed: map[string]error{}}
}

// Put records an outbound publish as pending before storing it.
func (s *AckStore) Put(key string, m packets.ControlPacket) {
	if p, ok := m.(*packets.PublishPacket); ok && p.Qos > 0 && strings.HasPrefix(key, "o.") {
		s.mu.Lock()
		if _, ok := s.pending[key]; !ok {
			s.pending[key] = make(chan error, 1)
		}
		delete(s.failed, key) // a new message with this packet ID
		s.mu.Unlock()
	}
	s.Store.Put(key, m)
}

// Del is paho forgetting a message: for an outbound publish, the broker's
// acknowledgement arrived.
func (s *AckStore) Del(key string) {
	s.Store.Del(key)
	s.finish(key, nil)
}

// Reset clears the store (a new clean session): what was pending is lost.
func (s *AckStore) Reset() {
	s.Store.Reset()
	s.failAll(fmt.Errorf("%w: session cleared", ErrNotAcknowledged))
}

// Close is the client's final disconnection: nothing pending will be sent.
func (s *AckStore) Close() {
	s.Store.Close()
	s.failAll(fmt.Errorf("%w: client closed", ErrNotAcknowledged))
}

func (s *AckStore) finish(key string, err error) {
	s.mu.Lock()
	ch, ok := s.pending[key]
	delete(s.pending, key)
	s.mu.Unlock()
	if ok {
		ch <- err
	}
}

func (s *AckStore) failAll(err error) {
	s.mu.Lock()
	old := s.pending
	s.pending = map[string]chan error{}
	for key := range old {
		s.failed[key] = err
	}
	s.mu.Unlock()
	for _, ch := range old {
		ch <- err
	}
}

// acked is the channel that tells the outcome of the message with packet
// ID id, or nil if none is pending (acknowledged already). For a message
// that failed (Reset, Close) it is a channel holding that error.
func (s *AckStore) acked(id uint16) <-chan error {
	key := fmt.Sprintf("o.%d", id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err, ok := s.failed[key]; ok {
		ch := make(chan error, 1)
		ch <- err
		return ch
	}
	return s.pending[key]
}

// Wait waits for t, a token of a Publish on the client that uses s, and
// for a QoS 1/2 message also for the broker's acknowledgement: nil means
// the broker acknowledged it. ctx bounds the wait (DefaultTimeout without
// a deadline); when it ends first the error wraps ErrTimeout and paho goes
// on sending the message (at least once).
func (s *AckStore) Wait(ctx context.Context, t paho.Token) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	pt, ok := t.(*paho.PublishToken)
	var ch <-chan error
	if ok && pt.MessageID() != 0 {
		// Put ran inside Publish, before it returned: the entry is there
		// unless the acknowledgement already came.
		ch = s.acked(pt.MessageID())
	}
	if err := wait(ctx, t); err != nil || ch == nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%w: %v (paho resends it)", ErrTimeout, ctx.Err())
	}
}

// Acked reports, without waiting, whether the broker acknowledged the
// message of t (a Publish token of the client that uses s): t completed
// without error and nothing of it is pending.
func (s *AckStore) Acked(t paho.Token) bool {
	// Not t.WaitTimeout(0): its select between the completed token and a
	// timer of 0 picks either at random.
	select {
	case <-t.Done():
	default:
		return false
	}
	if t.Error() != nil {
		return false
	}
	pt, ok := t.(*paho.PublishToken)
	return !ok || pt.MessageID() == 0 || s.acked(pt.MessageID()) == nil
}
