package badger

// Tests of fleetgate's patch: ephemeral (clean) sessions are not written.

import (
	"testing"

	badgerdb "github.com/dgraph-io/badger/v4"
	"github.com/stretchr/testify/require"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

func openHook(t *testing.T, dir string) *Hook {
	h := new(Hook)
	h.SetOpts(logger, nil)
	require.NoError(t, h.Init(&Options{Path: dir}))
	return h
}

func keyCount(t *testing.T, h *Hook) int {
	n := 0
	require.NoError(t, h.db.View(func(txn *badgerdb.Txn) error {
		it := txn.NewIterator(badgerdb.DefaultIteratorOptions)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			n++
		}
		return nil
	}))
	return n
}

func mkClient(id string, version byte, clean bool, expiry uint32) *mqtt.Client {
	cl := &mqtt.Client{ID: id, Properties: mqtt.ClientProperties{ProtocolVersion: version, Clean: clean}}
	cl.Properties.Props.SessionExpiryInterval = expiry
	return cl
}

func TestEphemeralSessionsNotWritten(t *testing.T) {
	h := openHook(t, t.TempDir())
	defer h.Stop()
	for _, cl := range []*mqtt.Client{mkClient("v3clean", 4, true, 0), mkClient("v5zero", 5, true, 0), mkClient("v5zero-noclean", 5, false, 0)} {
		h.OnSessionEstablished(cl, packets.Packet{})
		h.OnSubscribed(cl, pkf, []byte{1})
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: "a/b/c"}
		h.OnQosPublish(cl, pk, 0, 0)
		require.Zero(t, keyCount(t, h), "%s: nothing of an ephemeral session is stored", cl.ID)
		h.OnQosComplete(cl, pk)
		h.OnDisconnect(cl, nil, true)
		require.Zero(t, keyCount(t, h))
	}
}

func TestPersistentSessionsWritten(t *testing.T) {
	h := openHook(t, t.TempDir())
	defer h.Stop()
	for _, cl := range []*mqtt.Client{mkClient("v3", 4, false, 0), mkClient("v5", 5, true, 3600)} {
		h.OnSessionEstablished(cl, packets.Packet{})
		var c storage.Client
		require.NoError(t, h.getKv(clientKey(cl), &c), cl.ID)
		h.OnSubscribed(cl, pkf, []byte{1})
		var s storage.Subscription
		require.NoError(t, h.getKv(subscriptionKey(cl, "a/b/c"), &s), cl.ID)
	}
}

// A clean start of a client ID whose earlier persistent session is stored
// deletes that record, also after a restart (the hook learns the stored
// IDs when it opens), so a restart cannot resurrect the old session.
func TestCleanStartDeletesStoredSession(t *testing.T) {
	dir := t.TempDir()
	h := openHook(t, dir)
	persistent := mkClient("dev-1", 4, false, 0)
	h.OnSessionEstablished(persistent, packets.Packet{})
	h.OnDisconnect(persistent, nil, false)
	var c storage.Client
	require.NoError(t, h.getKv(clientKey(persistent), &c))
	require.NoError(t, h.Stop())

	h = openHook(t, dir)
	defer h.Stop()
	stored, err := h.StoredClients()
	require.NoError(t, err)
	require.Len(t, stored, 1)

	clean := mkClient("dev-1", 4, true, 0)
	h.OnSessionEstablished(clean, packets.Packet{})
	require.ErrorIs(t, h.getKv(clientKey(clean), &c), badgerdb.ErrKeyNotFound)
	stored, err = h.StoredClients()
	require.NoError(t, err)
	require.Empty(t, stored)
}

// persistentWithRecords stores a persistent session with a subscription and
// an in-flight message.
func persistentWithRecords(t *testing.T, h *Hook, cl *mqtt.Client) {
	before := keyCount(t, h)
	h.OnSessionEstablished(cl, packets.Packet{})
	h.OnSubscribed(cl, pkf, []byte{1})
	h.OnQosPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 9, TopicName: "a/b/c"}, 0, 0)
	require.Equal(t, before+3, keyCount(t, h))
}

// An MQTT 5 session made ephemeral at DISCONNECT (session expiry set to 0)
// leaves nothing behind, also across a restart.
func TestV5ExpiryZeroAtDisconnectForgetsSession(t *testing.T) {
	dir := t.TempDir()
	h := openHook(t, dir)
	cl := mkClient("v5", 5, false, 3600)
	persistentWithRecords(t, h, cl)
	cl.Properties.Props.SessionExpiryInterval = 0 // what mochi's processDisconnect does
	h.OnDisconnect(cl, nil, true)
	require.Zero(t, keyCount(t, h))
	require.NoError(t, h.Stop())
	h = openHook(t, dir)
	defer h.Stop()
	require.Zero(t, keyCount(t, h))
}

// Resuming a stored session with session expiry 0 (MQTT 5 clean start 0)
// makes it ephemeral: its stored subscriptions and in-flight messages go,
// so a restart cannot hand them to a later connection with that ID.
func TestV5ResumeWithExpiryZeroForgetsStoredRecords(t *testing.T) {
	h := openHook(t, t.TempDir())
	defer h.Stop()
	persistentWithRecords(t, h, mkClient("v5", 5, false, 3600))
	h.OnSessionEstablished(mkClient("v5", 5, false, 0), packets.Packet{})
	require.Zero(t, keyCount(t, h))
}

// A clean connection takes over a persistent one: the old connection's
// disconnect (after the takeover) does not write its record back.
func TestTakeoverPersistentByCleanLeavesNothing(t *testing.T) {
	h := openHook(t, t.TempDir())
	defer h.Stop()
	old := mkClient("dev", 4, false, 0)
	persistentWithRecords(t, h, old)
	h.OnSessionEstablished(mkClient("dev", 4, true, 0), packets.Packet{})
	old.Stop(packets.ErrSessionTakenOver)
	h.OnDisconnect(old, packets.ErrSessionTakenOver, false)
	require.Zero(t, keyCount(t, h))
}

// Records that a session ending with its connection left behind (a crash,
// or an earlier version) are deleted when the store opens; a persistent
// session's are kept.
func TestOpenDeletesLeftoverEphemeralSessions(t *testing.T) {
	dir := t.TempDir()
	h := openHook(t, dir)
	clean := mkClient("left", 4, true, 0)
	require.NoError(t, h.setKv(clientKey(clean), &storage.Client{ID: "left", Clean: true, ProtocolVersion: 4, T: storage.ClientKey}))
	require.NoError(t, h.setKv(subscriptionKey(clean, "a/b"), &storage.Subscription{ID: subscriptionKey(clean, "a/b"), Client: "left", Filter: "a/b", T: storage.SubscriptionKey}))
	persistentWithRecords(t, h, mkClient("keep", 4, false, 0))
	require.Equal(t, 5, keyCount(t, h))
	require.NoError(t, h.Stop())
	h = openHook(t, dir)
	defer h.Stop()
	require.Equal(t, 3, keyCount(t, h))
	stored, err := h.StoredClients()
	require.NoError(t, err)
	require.Len(t, stored, 1)
	require.Equal(t, "keep", stored[0].ID)
}

// Client IDs may contain ':', the separator of record keys: forgetting
// client "a" leaves the records of client "a:b" (whose keys start with
// "a:") alone.
func TestForgetClientKeepsPrefixSharingIDs(t *testing.T) {
	h := openHook(t, t.TempDir())
	defer h.Stop()
	persistentWithRecords(t, h, mkClient("a", 4, false, 0))
	persistentWithRecords(t, h, mkClient("a:b", 4, false, 0))
	h.OnSessionEstablished(mkClient("a", 4, true, 0), packets.Packet{}) // clean start of "a"
	require.Equal(t, 3, keyCount(t, h), "only a:b's three records remain")
	stored, err := h.StoredClients()
	require.NoError(t, err)
	require.Len(t, stored, 1)
	require.Equal(t, "a:b", stored[0].ID)
}
