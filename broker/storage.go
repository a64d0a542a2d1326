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
// with expiry 0) or ends (mochi's hook deletes only the client record then,
// so a restart resurrected the subscriptions and messages); the disconnect
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

	mu     sync.Mutex
	stored map[string]*storedSession // client IDs with records in the store
}

// storedSession is what the store holds for one client ID (its client
// record is implied: deletes always include it).
type storedSession struct {
	filters  map[string]struct{} // subscription records, by filter
	inflight map[uint16]struct{} // in-flight records, by packet ID
}

func newStorageHook() *storageHook {
	return &storageHook{Hook: new(badgerhook.Hook), stored: make(map[string]*storedSession)}
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
	h.mu.Lock()
	for _, c := range clients {
		h.sessionLocked(c.ID)
		if (c.ProtocolVersion == 5 && c.Properties.SessionExpiryInterval == 0) || (c.ProtocolVersion < 5 && c.Clean) {
			gone = append(gone, c.ID)
		}
	}
	for _, s := range subs {
		h.sessionLocked(s.Client).addFilter(s.Filter)
	}
	for _, m := range inflight {
		h.sessionLocked(m.Client).addInflight(m.PacketID)
	}
	h.mu.Unlock()
	for _, id := range gone {
		h.forget(id)
	}
	return nil
}

func (h *storageHook) closeAfter(err error) error {
	return errors.Join(err, h.Hook.Stop())
}

// sessionLocked returns the records of id, creating an empty entry; h.mu
// must be held.
func (h *storageHook) sessionLocked(id string) *storedSession {
	s := h.stored[id]
	if s == nil {
		s = new(storedSession)
		h.stored[id] = s
	}
	return s
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
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.stored[id] != nil
}

// forget deletes every record of client ID id — its client record,
// subscriptions and in-flight messages — if it may have any.
func (h *storageHook) forget(id string) {
	h.mu.Lock()
	s := h.stored[id]
	delete(h.stored, id)
	h.mu.Unlock()
	if s != nil {
		h.deleteRecords(id, s)
	}
}

// deleteRecords deletes the client record of id and the records s lists,
// through mochi's badger hook (which keys them by client ID, filter and
// packet ID).
func (h *storageHook) deleteRecords(id string, s *storedSession) {
	cl := &mqtt.Client{ID: id}
	h.Hook.OnClientExpired(cl) // deletes the client record
	if len(s.filters) > 0 {
		filters := make([]packets.Subscription, 0, len(s.filters))
		for f := range s.filters {
			filters = append(filters, packets.Subscription{Filter: f})
		}
		h.Hook.OnUnsubscribed(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Unsubscribe}, Filters: filters})
	}
	for pid := range s.inflight {
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
	h.mu.Lock()
	h.sessionLocked(cl.ID)
	h.mu.Unlock()
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
	h.mu.Lock()
	s := h.sessionLocked(cl.ID)
	for _, f := range pk.Filters {
		s.addFilter(f.Filter)
	}
	h.mu.Unlock()
}

// OnUnsubscribed deletes stored subscriptions, if the ID has records.
func (h *storageHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !h.mayHave(cl.ID) {
		return
	}
	h.Hook.OnUnsubscribed(cl, pk)
	h.mu.Lock()
	if s := h.stored[cl.ID]; s != nil {
		for _, f := range pk.Filters {
			delete(s.filters, f.Filter)
		}
	}
	h.mu.Unlock()
}

// OnQosPublish stores an in-flight message of a persistent session.
func (h *storageHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if ephemeral(cl) {
		return
	}
	h.Hook.OnQosPublish(cl, pk, sent, resends)
	h.mu.Lock()
	h.sessionLocked(cl.ID).addInflight(pk.PacketID)
	h.mu.Unlock()
}

// OnQosComplete deletes a finished in-flight message, if the ID has
// records.
func (h *storageHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	if !h.mayHave(cl.ID) {
		return
	}
	h.Hook.OnQosComplete(cl, pk)
	h.mu.Lock()
	if s := h.stored[cl.ID]; s != nil {
		delete(s.inflight, pk.PacketID)
	}
	h.mu.Unlock()
}

// OnQosDropped deletes a dropped in-flight message, as OnQosComplete.
func (h *storageHook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	h.OnQosComplete(cl, pk)
}

// OnClientExpired deletes all records of an expired session (mochi's hook
// deletes only the client record).
func (h *storageHook) OnClientExpired(cl *mqtt.Client) {
	h.mu.Lock()
	s := h.stored[cl.ID]
	delete(h.stored, cl.ID)
	h.mu.Unlock()
	if s == nil {
		s = new(storedSession) // the client record, whatever this process knows
	}
	h.deleteRecords(cl.ID, s)
}
