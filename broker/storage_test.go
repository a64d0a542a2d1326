package broker_test

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	badgerdb "github.com/dgraph-io/badger/v4"
	mqtt "github.com/mochi-mqtt/server/v2"
	badgerhook "github.com/mochi-mqtt/server/v2/hooks/storage/badger"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// The storage hook (storage.go) through the running broker with its real
// badger store: of a clean session nothing is written, not even the
// in-flight command it received; a persistent session's client record,
// subscription and the command queued while it was offline are stored.
// (mochi's badger hook alone also ends with nothing of the clean session,
// having written and deleted it; the tests in storage_internal_test.go and
// the next one tell the two apart.)
func TestStorageCleanSessionsNotWrittenPersistentStored(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	clean := g.EnrollDevice(t, "st-clean", "lab")
	keep := g.EnrollDevice(t, "st-keep", "lab")

	cc, err := clean.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 4)
	if err := cc.SubscribeCommands(ctx, 1, func(m devicesdk.Message) { got <- m.Topic }); err != nil {
		t.Fatal(err)
	}
	persistent := brokerOpts(g)
	persistent.CleanSession = false
	kc, err := keep.Connect(ctx, persistent)
	if err != nil {
		t.Fatal(err)
	}
	if err := kc.SubscribeCommands(ctx, 1, func(devicesdk.Message) {}); err != nil {
		t.Fatal(err)
	}
	kc.Close() // offline: its session holds the next command

	cert := g.Service(t, "st-commander")
	svc, err := g.MQTT(t, "st-commander", &cert)
	if err != nil {
		t.Fatal(err)
	}
	for _, topic := range []string{"devices/st-clean/commands/reboot", "devices/st-keep/commands/reboot"} {
		if tok := svc.Publish(topic, 1, false, []byte("now")); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", topic, tok.Error())
		}
	}
	select {
	case <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the clean session got no command")
	}
	cc.Close()
	svc.Disconnect(100)

	dir := g.DataDir
	g.Stop()
	keys := storedSessionKeys(t, filepath.Join(dir, "broker"))
	for _, k := range keys {
		if strings.Contains(k, "st-clean") || strings.Contains(k, "st-commander") {
			t.Errorf("record %s of a clean session in the store", k)
		}
	}
	for _, want := range []string{"CL_st-keep", "SUB_st-keep:devices/st-keep/commands/#", "IFM_st-keep:"} {
		if !slices.ContainsFunc(keys, func(k string) bool { return strings.HasPrefix(k, want) }) {
			t.Errorf("no record %s* of the persistent session in the store: %v", want, keys)
		}
	}
}

// Records a clean session left in the store (a crash, or a version that
// stored clean sessions, as mochi's badger hook does) are deleted when the
// broker opens it; a persistent session's records are kept and restored.
func TestStorageLeftoversOfCleanSessionsDeletedAtStart(t *testing.T) {
	dir := testenv.Init(t)
	// Seed the store as mochi's badger hook alone writes it.
	seed := new(badgerhook.Hook)
	seed.SetOpts(slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err := seed.Init(&badgerhook.Options{Path: filepath.Join(dir, "broker")}); err != nil {
		t.Fatal(err)
	}
	subs := packets.Packet{Filters: packets.Subscriptions{{Filter: "devices/st-left/commands/#"}}}
	cmd := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 3, TopicName: "devices/st-left/commands/x", Created: time.Now().Unix()}
	for _, cl := range []*mqtt.Client{
		{ID: "st-left", Properties: mqtt.ClientProperties{ProtocolVersion: 4, Clean: true}},
		{ID: "st-kept", Properties: mqtt.ClientProperties{ProtocolVersion: 4}},
	} {
		seed.OnSessionEstablished(cl, packets.Packet{})
		seed.OnSubscribed(cl, subs, []byte{1})
		seed.OnQosPublish(cl, cmd, 0, 0)
	}
	if err := seed.Stop(); err != nil {
		t.Fatal(err)
	}
	if n := len(storedSessionKeys(t, filepath.Join(dir, "broker"))); n != 6 {
		t.Fatalf("seeded %d records, want 6", n)
	}

	g := testenv.Start(t, testenv.Options{DataDir: dir})
	g.Stop()
	keys := storedSessionKeys(t, filepath.Join(dir, "broker"))
	slices.Sort(keys)
	want := []string{"CL_st-kept", "IFM_st-kept:3", "SUB_st-kept:devices/st-left/commands/#"}
	if !slices.Equal(keys, want) {
		t.Fatalf("records after a start %v, want %v", keys, want)
	}
}

// storedSessionKeys lists the keys of the client, subscription and
// in-flight records in the broker's badger store.
func storedSessionKeys(t *testing.T, dir string) []string {
	t.Helper()
	db, err := badgerdb.Open(badgerdb.DefaultOptions(dir).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var keys []string
	err = db.View(func(txn *badgerdb.Txn) error {
		for _, prefix := range []string{"CL_", "SUB_", "IFM_"} {
			it := txn.NewIterator(badgerdb.IteratorOptions{Prefix: []byte(prefix)})
			for it.Rewind(); it.Valid(); it.Next() {
				keys = append(keys, string(it.Item().Key()))
			}
			it.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return keys
}
