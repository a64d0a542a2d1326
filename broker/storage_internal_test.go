package broker

// Tests of the storage hook's rules (storage.go) against a real badger
// store. Until issue 12 they were the tests of the mochi fork's badger
// patch (hooks/storage/badger/fleetgate_test.go); the assertions are the
// same, the records are counted through the hook's Stored* methods.

import (
	"io"
	"log/slog"
	"slices"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"
	badgerhook "github.com/mochi-mqtt/server/v2/hooks/storage/badger"
	"github.com/mochi-mqtt/server/v2/packets"
)

var storagePkf = packets.Packet{Filters: packets.Subscriptions{{Filter: "a/b/c"}}}

func openStorageHook(t *testing.T, dir string) *storageHook {
	t.Helper()
	h := newStorageHook()
	h.SetOpts(slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err := h.Init(&badgerhook.Options{Path: dir}); err != nil {
		t.Fatal(err)
	}
	return h
}

// recordCount is the number of records in the store: clients,
// subscriptions, in-flight and retained messages, system info.
func recordCount(t *testing.T, h *storageHook) int {
	t.Helper()
	cls, err := h.StoredClients()
	if err != nil {
		t.Fatal(err)
	}
	subs, err := h.StoredSubscriptions()
	if err != nil {
		t.Fatal(err)
	}
	ifm, err := h.StoredInflightMessages()
	if err != nil {
		t.Fatal(err)
	}
	ret, err := h.StoredRetainedMessages()
	if err != nil {
		t.Fatal(err)
	}
	n := len(cls) + len(subs) + len(ifm) + len(ret)
	if sys, err := h.StoredSysInfo(); err != nil {
		t.Fatal(err)
	} else if sys.ID != "" {
		n++
	}
	return n
}

func storedClientIDs(t *testing.T, h *storageHook) []string {
	t.Helper()
	cls, err := h.StoredClients()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range cls {
		ids = append(ids, c.ID)
	}
	slices.Sort(ids)
	return ids
}

func storedFilters(t *testing.T, h *storageHook, id string) []string {
	t.Helper()
	subs, err := h.StoredSubscriptions()
	if err != nil {
		t.Fatal(err)
	}
	var fs []string
	for _, s := range subs {
		if s.Client == id {
			fs = append(fs, s.Filter)
		}
	}
	return fs
}

func mkStorageClient(id string, version byte, clean bool, expiry uint32) *mqtt.Client {
	cl := &mqtt.Client{ID: id, Properties: mqtt.ClientProperties{ProtocolVersion: version, Clean: clean}}
	cl.Properties.Props.SessionExpiryInterval = expiry
	return cl
}

func TestEphemeralSessionsNotWritten(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	for _, cl := range []*mqtt.Client{mkStorageClient("v3clean", 4, true, 0), mkStorageClient("v5zero", 5, true, 0), mkStorageClient("v5zero-noclean", 5, false, 0)} {
		h.OnSessionEstablished(cl, packets.Packet{})
		h.OnSubscribed(cl, storagePkf, []byte{1})
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7, TopicName: "a/b/c"}
		h.OnQosPublish(cl, pk, 0, 0)
		if n := recordCount(t, h); n != 0 {
			t.Fatalf("%s: %d records, want none of an ephemeral session", cl.ID, n)
		}
		h.OnQosComplete(cl, pk)
		h.OnDisconnect(cl, nil, true)
		if n := recordCount(t, h); n != 0 {
			t.Fatalf("%s: %d records after disconnect", cl.ID, n)
		}
	}
}

func TestPersistentSessionsWritten(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	for _, cl := range []*mqtt.Client{mkStorageClient("v3", 4, false, 0), mkStorageClient("v5", 5, true, 3600)} {
		h.OnSessionEstablished(cl, packets.Packet{})
		if !slices.Contains(storedClientIDs(t, h), cl.ID) {
			t.Fatalf("%s: no client record", cl.ID)
		}
		h.OnSubscribed(cl, storagePkf, []byte{1})
		if got := storedFilters(t, h, cl.ID); !slices.Equal(got, []string{"a/b/c"}) {
			t.Fatalf("%s: stored subscriptions %v", cl.ID, got)
		}
	}
}

// A clean start of a client ID whose earlier persistent session is stored
// deletes that record, also after a restart (the hook learns the stored
// IDs when it opens), so a restart cannot resurrect the old session.
func TestCleanStartDeletesStoredSession(t *testing.T) {
	dir := t.TempDir()
	h := openStorageHook(t, dir)
	persistent := mkStorageClient("dev-1", 4, false, 0)
	h.OnSessionEstablished(persistent, packets.Packet{})
	h.OnDisconnect(persistent, nil, false)
	if got := storedClientIDs(t, h); !slices.Equal(got, []string{"dev-1"}) {
		t.Fatalf("stored clients %v", got)
	}
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}

	h = openStorageHook(t, dir)
	defer h.Stop()
	if got := storedClientIDs(t, h); len(got) != 1 {
		t.Fatalf("after restart: stored clients %v", got)
	}
	h.OnSessionEstablished(mkStorageClient("dev-1", 4, true, 0), packets.Packet{})
	if got := storedClientIDs(t, h); len(got) != 0 {
		t.Fatalf("after the clean start: stored clients %v", got)
	}
}

// persistentWithRecords stores a persistent session with a subscription and
// an in-flight message.
func persistentWithRecords(t *testing.T, h *storageHook, cl *mqtt.Client) {
	t.Helper()
	before := recordCount(t, h)
	h.OnSessionEstablished(cl, packets.Packet{})
	h.OnSubscribed(cl, storagePkf, []byte{1})
	h.OnQosPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 9, TopicName: "a/b/c"}, 0, 0)
	if n := recordCount(t, h); n != before+3 {
		t.Fatalf("%d records, want %d", n, before+3)
	}
}

// An MQTT 5 session made ephemeral at DISCONNECT (session expiry set to 0)
// leaves nothing behind, also across a restart.
func TestV5ExpiryZeroAtDisconnectForgetsSession(t *testing.T) {
	dir := t.TempDir()
	h := openStorageHook(t, dir)
	cl := mkStorageClient("v5", 5, false, 3600)
	persistentWithRecords(t, h, cl)
	cl.Properties.Props.SessionExpiryInterval = 0 // what mochi's processDisconnect does
	h.OnDisconnect(cl, nil, true)
	if n := recordCount(t, h); n != 0 {
		t.Fatalf("%d records", n)
	}
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	h = openStorageHook(t, dir)
	defer h.Stop()
	if n := recordCount(t, h); n != 0 {
		t.Fatalf("after restart: %d records", n)
	}
}

// Resuming a stored session with session expiry 0 (MQTT 5 clean start 0)
// makes it ephemeral: its stored subscriptions and in-flight messages go,
// so a restart cannot hand them to a later connection with that ID.
func TestV5ResumeWithExpiryZeroForgetsStoredRecords(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	persistentWithRecords(t, h, mkStorageClient("v5", 5, false, 3600))
	h.OnSessionEstablished(mkStorageClient("v5", 5, false, 0), packets.Packet{})
	if n := recordCount(t, h); n != 0 {
		t.Fatalf("%d records", n)
	}
}

// A clean connection takes over a persistent one: the old connection's
// disconnect (after the takeover) does not write its record back.
func TestTakeoverPersistentByCleanLeavesNothing(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	old := mkStorageClient("dev", 4, false, 0)
	persistentWithRecords(t, h, old)
	h.OnSessionEstablished(mkStorageClient("dev", 4, true, 0), packets.Packet{})
	old.Stop(packets.ErrSessionTakenOver)
	h.OnDisconnect(old, packets.ErrSessionTakenOver, false)
	if n := recordCount(t, h); n != 0 {
		t.Fatalf("%d records", n)
	}
}

// Records that a session ending with its connection left behind (a crash,
// or an earlier version) are deleted when the store opens; a persistent
// session's are kept.
func TestOpenDeletesLeftoverEphemeralSessions(t *testing.T) {
	dir := t.TempDir()
	h := openStorageHook(t, dir)
	// What mochi's badger hook alone (an earlier version) writes of a
	// clean session: its client record and subscription.
	clean := mkStorageClient("left", 4, true, 0)
	h.Hook.OnSessionEstablished(clean, packets.Packet{})
	h.Hook.OnSubscribed(clean, packets.Packet{Filters: packets.Subscriptions{{Filter: "a/b"}}}, []byte{1})
	persistentWithRecords(t, h, mkStorageClient("keep", 4, false, 0))
	if n := recordCount(t, h); n != 5 {
		t.Fatalf("%d records, want 5", n)
	}
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	h = openStorageHook(t, dir)
	defer h.Stop()
	if n := recordCount(t, h); n != 3 {
		t.Fatalf("after restart: %d records, want 3", n)
	}
	if got := storedClientIDs(t, h); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("stored clients %v", got)
	}
}

// Client IDs may contain ':', the separator of record keys: forgetting
// client "a" leaves the records of client "a:b" (whose keys start with
// "a:") alone.
func TestForgetClientKeepsPrefixSharingIDs(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	persistentWithRecords(t, h, mkStorageClient("a", 4, false, 0))
	persistentWithRecords(t, h, mkStorageClient("a:b", 4, false, 0))
	h.OnSessionEstablished(mkStorageClient("a", 4, true, 0), packets.Packet{}) // clean start of "a"
	if n := recordCount(t, h); n != 3 {
		t.Fatalf("%d records, want a:b's three", n)
	}
	if got := storedClientIDs(t, h); !slices.Equal(got, []string{"a:b"}) {
		t.Fatalf("stored clients %v", got)
	}
}

// Records written while the ID's records are being deleted are not lost
// track of: a later delete removes them too (no orphans in the store). The
// interleaving that needs storedSession.gone is rare here; the test is
// mostly for the race detector.
func TestForgetConcurrentWithWrites(t *testing.T) {
	h := openStorageHook(t, t.TempDir())
	defer h.Stop()
	cl := mkStorageClient("dev", 4, false, 0)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; i <= 300; i++ {
			h.OnQosPublish(cl, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: uint16(i), TopicName: "a/b/c"}, 0, 0)
			if i%10 == 0 {
				h.OnSubscribed(cl, packets.Packet{Filters: packets.Subscriptions{{Filter: "f/" + string(rune('a'+i/10))}}}, []byte{1})
			}
		}
	}()
	for range 50 {
		h.OnSessionEstablished(mkStorageClient("dev", 4, true, 0), packets.Packet{}) // clean start: deletes all
	}
	<-done
	h.OnSessionEstablished(mkStorageClient("dev", 4, true, 0), packets.Packet{})
	if n := recordCount(t, h); n != 0 {
		t.Fatalf("%d records left after the last clean start", n)
	}
}
