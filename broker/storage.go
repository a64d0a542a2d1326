package broker

import (
	"errors"
	"fmt"
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	badgerhook "github.com/mochi-mqtt/server/v2/hooks/storage/badger"
	"github.com/mochi-mqtt/server/v2/packets"
)

// storageHook is the broker's persistence: mochi's badger storage hook
// (upstream's, unchanged: same keys and records), with two rules on top.
//
// Ephemeral sessions are not written. A clean session (MQTT 3) or one with
// session expiry 0 (MQTT 5) ends with its connection and cannot be restored
// after a restart, yet mochi's hook writes its client record at connect and
// at disconnect, deletes it, and writes and deletes every in-flight QoS 1/2
// message to it: three badger transactions per connection and two per
// message for nothing. Nothing of such a session reaches the badger hook.
//
// Deletes follow the stored records, not the session's kind. The hook knows
// (from startup on) which records each client ID has — client,
// subscriptions, in-flight messages — and deletes all of them when a session
// of that ID becomes ephemeral (clean start, an MQTT 5 resume or DISCONNECT
// with expiry 0) or ends (at session expiry mochi's hook deletes only the
// client record, and its subscriptions and in-flight messages stayed in the
// store for good); the disconnect
// of a connection that was taken over writes nothing (the session is the
// new connection's, which wrote or deleted the records). Records an
// ephemeral session left behind (a crash, a version that stored such
// sessions) are deleted when the store opens. Persistent sessions are
// stored as mochi stores them.
//
// Until issue 12 this was a patch of the badger hook in fleetgate's mochi
// fork; it needs nothing but mochi's hook API.
type storageHook struct {
	*badgerhook.Hook

	// stored holds the client IDs that have records in the store
	// (*storedSession); reads on the message path take no lock.
	stored sync.Map
}

// storedSession is what the store holds for one client ID (its client
// record is implied: deletes always include it).
type storedSession struct {
	mu       sync.Mutex
	gone     bool                // forgotten: records go to a new entry
	filters  map[string]struct{} // subscription records, by filter
	inflight map[uint16]struct{} // in-flight records, by packet ID
}

func newStorageHook() *storageHook {
	return &storageHook{Hook: new(badgerhook.Hook)}
}

// ID returns the id of the hook.
func (h *storageHook) ID() string { return "fleetgate-storage" }

// ephemeral reports whether a client's session ends with its connection
// (MQTT 3 clean session, MQTT 5 session expiry 0).
func ephemeral(cl *mqtt.Client) bool {
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryInterval == 0
	}
	return cl.Properties.Clean
}

// Init opens the store, learns which client IDs have records, and deletes
// what sessions that ended with their connection left behind.
func (h *storageHook) Init(config any) error {
	if err := h.Hook.Init(config); err != nil {
		return err
	}
	clients, err := h.Hook.StoredClients()
	if err != nil {
		return h.closeAfter(fmt.Errorf("read stored clients: %w", err))
	}
	subs, err := h.Hook.StoredSubscriptions()
	if err != nil {
		return h.closeAfter(fmt.Errorf("read stored subscriptions: %w", err))
	}
	inflight, err := h.Hook.StoredInflightMessages()
	if err != nil {
		return h.closeAfter(fmt.Errorf("read stored in-flight messages: %w", err))
	}
	var gone []string
	for _, c := range clients {
		h.record(c.ID, nil)
		if (c.ProtocolVersion == 5 && c.Properties.SessionExpiryInterval == 0) || (c.ProtocolVersion < 5 && c.Clean) {
			gone = append(gone, c.ID)
		}
	}
	for _, sub := range subs {
		h.record(sub.Client, func(s *storedSession) { s.addFilter(sub.Filter) })
	}
	for _, m := range inflight {
		h.record(m.Client, func(s *storedSession) { s.addInflight(m.PacketID) })
	}
	for _, id := range gone {
		h.forget(id)
	}
	return nil
}

func (h *storageHook) closeAfter(err error) error {
	return errors.Join(err, h.Hook.Stop())
}

// record notes that client ID id has records in the store, and applies add
// (if not nil) to its entry. Call it after writing the record: a forget
// that runs meanwhile either sees the addition (and deletes the record) or
// leaves it to a new entry.
func (h *storageHook) record(id string, add func(*storedSession)) {
	for {
		v, _ := h.stored.LoadOrStore(id, new(storedSession))
		s := v.(*storedSession)
		s.mu.Lock()
		if s.gone {
			s.mu.Unlock()
			h.stored.CompareAndDelete(id, s)
			continue
		}
		if add != nil {
			add(s)
		}
		s.mu.Unlock()
		return
	}
}

// unrecord applies del to the entry of id, if it has one.
func (h *storageHook) unrecord(id string, del func(*storedSession)) {
	if v, ok := h.stored.Load(id); ok {
		s := v.(*storedSession)
		s.mu.Lock()
		del(s)
		s.mu.Unlock()
	}
}

func (s *storedSession) addFilter(f string) {
	if s.filters == nil {
		s.filters = make(map[string]struct{}, 1)
	}
	s.filters[f] = struct{}{}
}

func (s *storedSession) addInflight(id uint16) {
	if s.inflight == nil {
		s.inflight = make(map[uint16]struct{})
	}
	s.inflight[id] = struct{}{}
}

// mayHave reports whether client ID id may have records in the store.
func (h *storageHook) mayHave(id string) bool {
	_, ok := h.stored.Load(id)
	return ok
}

// forget deletes every record of client ID id — its client record,
// subscriptions and in-flight messages — if it may have any.
func (h *storageHook) forget(id string) {
	if v, ok := h.stored.LoadAndDelete(id); ok {
		h.deleteRecords(id, v.(*storedSession))
	}
}

// deleteRecords deletes the client record of id and the records s lists,
// through mochi's badger hook (which keys them by client ID, filter and
// packet ID). s is marked gone first, so that records written meanwhile
// are noted in a new entry.
func (h *storageHook) deleteRecords(id string, s *storedSession) {
	s.mu.Lock()
	s.gone = true
	filters := make([]packets.Subscription, 0, len(s.filters))
	for f := range s.filters {
		filters = append(filters, packets.Subscription{Filter: f})
	}
	inflight := make([]uint16, 0, len(s.inflight))
	for pid := range s.inflight {
		inflight = append(inflight, pid)
	}
	s.mu.Unlock()

	cl := &mqtt.Client{ID: id}
	h.Hook.OnClientExpired(cl) // deletes the client record
	if len(filters) > 0 {
		h.Hook.OnUnsubscribed(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe}, Filters: filters})
	}
	for _, pid := range inflight {
		h.Hook.OnQosComplete(cl, packets.Packet{PacketID: pid})
	}
}

// OnSessionEstablished stores a persistent session's client record, or
// deletes the records of an ID whose new session is ephemeral.
func (h *storageHook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	h.updateClient(cl, func() { h.Hook.OnSessionEstablished(cl, pk) })
}

// OnWillSent rewrites the client record (without its will) of a persistent
// session.
func (h *storageHook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	h.updateClient(cl, func() { h.Hook.OnWillSent(cl, pk) })
}

// updateClient writes cl's client record with write, or, when cl's session
// is ephemeral, deletes all records of its ID.
func (h *storageHook) updateClient(cl *mqtt.Client, write func()) {
	if ephemeral(cl) {
		h.forget(cl.ID)
		return
	}
	write()
	h.record(cl.ID, nil)
}

// OnDisconnect writes the client record of a persistent session that
// outlives its connection; it deletes all records of a session that ends
// (expired, or ephemeral: also one made so by an MQTT 5 DISCONNECT with
// session expiry 0). A connection taken over writes nothing: the session is
// the new connection's.
func (h *storageHook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if errors.Is(cl.StopCause(), packets.ErrSessionTakenOver) {
		return
	}
	if expire || ephemeral(cl) {
		h.forget(cl.ID)
		return
	}
	h.updateClient(cl, func() { h.Hook.OnDisconnect(cl, err, false) })
}

// OnSubscribed stores the subscriptions of a persistent session.
func (h *storageHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	if ephemeral(cl) {
		return
	}
	h.Hook.OnSubscribed(cl, pk, reasonCodes)
	h.record(cl.ID, func(s *storedSession) {
		for _, f := range pk.Filters {
			s.addFilter(f.Filter)
		}
	})
}

// OnUnsubscribed deletes stored subscriptions, if the ID has records.
func (h *storageHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !h.mayHave(cl.ID) {
		return
	}
	h.Hook.OnUnsubscribed(cl, pk)
	h.unrecord(cl.ID, func(s *storedSession) {
		for _, f := range pk.Filters {
			delete(s.filters, f.Filter)
		}
	})
}

// OnQosPublish stores an in-flight message of a persistent session.
func (h *storageHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if ephemeral(cl) {
		return
	}
	h.Hook.OnQosPublish(cl, pk, sent, resends)
	h.record(cl.ID, func(s *storedSession) { s.addInflight(pk.PacketID) })
}

// OnQosComplete deletes a finished in-flight message, if the ID has
// records.
func (h *storageHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if !h.mayHave(cl.ID) {
		return
	}
	h.Hook.OnQosComplete(cl, pk)
	h.unrecord(cl.ID, func(s *storedSession) { delete(s.inflight, pk.PacketID) })
}

// OnQosDropped deletes a dropped in-flight message, as OnQosComplete.
func (h *storageHook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	h.OnQosComplete(cl, pk)
}

// OnClientExpired deletes all records of an expired session (mochi's hook
// deletes only the client record).
func (h *storageHook) OnClientExpired(cl *mqtt.Client) {
	s := new(storedSession) // at least the client record
	if v, ok := h.stored.LoadAndDelete(cl.ID); ok {
		s = v.(*storedSession)
	}
	h.deleteRecords(cl.ID, s)
}
