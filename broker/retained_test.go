package broker_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	badgerdb "github.com/dgraph-io/badger/v4"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// retainedFor subscribes a new service session to devices/+/state and
// returns the topics of the retained messages it is sent. A marker the
// service publishes after its SUBACK arrives after every retained message
// (one subscriber's deliveries are queued in order), so the answer does
// not depend on waiting.
func retainedFor(t *testing.T, g *testenv.Gateway, name string) []string {
	t.Helper()
	cert := g.Service(t, name)
	c, err := g.MQTT(t, name, &cert, func(o *paho.ClientOptions) { o.SetOrderMatters(true) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(100)
	var mu sync.Mutex
	var got []string
	marker := make(chan struct{})
	filters := map[string]byte{"devices/+/state": 1, "devices/marker/commands/" + name: 1}
	tok := c.SubscribeMultiple(filters, func(_ paho.Client, m paho.Message) {
		if strings.HasSuffix(m.Topic(), "/commands/"+name) {
			close(marker)
			return
		}
		if m.Retained() {
			mu.Lock()
			got = append(got, m.Topic())
			mu.Unlock()
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	if tok := c.Publish("devices/marker/commands/"+name, 1, false, "m"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("marker: %v", tok.Error())
	}
	select {
	case <-marker:
	case <-time.After(10 * time.Second):
		t.Fatal("marker not received")
	}
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(got)
	return got
}

// A device's retained state is not served while the device is suspended,
// is served again once it is resumed, and is deleted when the device is
// revoked — from memory and from the store, so also not after a restart.
// QoS 0 and QoS 1 retained messages (the latter go through the fan-out
// client before their PUBACK) are both attributed to their device.
func TestRetainedOfRevokedDeviceNotServed(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DataDir: testenv.Init(t)})
	ctx := context.Background()
	for _, d := range []struct {
		id  string
		qos byte
	}{{"ret-q0", 0}, {"ret-q1", 1}, {"ret-keep", 1}} {
		dev := g.EnrollDevice(t, d.id, "lab")
		c, err := g.MQTT(t, d.id, ptr(certOf(t, dev)))
		if err != nil {
			t.Fatal(err)
		}
		if tok := c.Publish("devices/"+d.id+"/state", d.qos, true, "on"); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("retain: %v", tok.Error())
		}
		c.Disconnect(100)
	}
	all := []string{"devices/ret-keep/state", "devices/ret-q0/state", "devices/ret-q1/state"}
	// The QoS 0 retain is processed after the publisher's next packet at the
	// latest; wait until it is there.
	testenv.Eventually(t, 10*time.Second, func() error {
		if got := retainedFor(t, g, fmt.Sprintf("w-%d", time.Now().UnixNano()%1e6)); !slices.Equal(got, all) {
			return fmt.Errorf("retained %v, want %v", got, all)
		}
		return nil
	})

	if _, err := g.Admin.DeviceAction(ctx, "ret-q0", "suspend", "test"); err != nil {
		t.Fatal(err)
	}
	if got, want := retainedFor(t, g, "w-suspended"), []string{"devices/ret-keep/state", "devices/ret-q1/state"}; !slices.Equal(got, want) {
		t.Fatalf("while ret-q0 is suspended: retained %v, want %v", got, want)
	}
	if _, err := g.Admin.DeviceAction(ctx, "ret-q0", "resume", "test"); err != nil {
		t.Fatal(err)
	}
	if got := retainedFor(t, g, "w-resumed"); !slices.Equal(got, all) {
		t.Fatalf("after resume: retained %v, want %v", got, all)
	}

	for _, id := range []string{"ret-q0", "ret-q1"} {
		if _, err := g.Admin.DeviceAction(ctx, id, "revoke", "test"); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := retainedFor(t, g, "w-revoked"), []string{"devices/ret-keep/state"}; !slices.Equal(got, want) {
		t.Fatalf("after revocation: retained %v, want %v", got, want)
	}

	// Deleted from the store: only the kept device's record is there.
	dir := g.DataDir
	g.Stop()
	if got, want := storedRetained(t, filepath.Join(dir, "broker")), []string{"devices/ret-keep/state"}; !slices.Equal(got, want) {
		t.Fatalf("retained records in the store %v, want %v", got, want)
	}
	g2 := testenv.Start(t, testenv.Options{DataDir: dir})
	if got, want := retainedFor(t, g2, "w-restarted"), []string{"devices/ret-keep/state"}; !slices.Equal(got, want) {
		t.Fatalf("after restart: retained %v, want %v", got, want)
	}
}

// storedRetained lists the topics of the retained records in mochi's
// badger store (keys RET_<topic>).
func storedRetained(t *testing.T, dir string) []string {
	t.Helper()
	db, err := badgerdb.Open(badgerdb.DefaultOptions(dir).WithLogger(nil).WithReadOnly(false))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var topics []string
	err = db.View(func(txn *badgerdb.Txn) error {
		it := txn.NewIterator(badgerdb.IteratorOptions{Prefix: []byte("RET_")})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			topics = append(topics, strings.TrimPrefix(string(it.Item().Key()), "RET_"))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(topics)
	return topics
}
