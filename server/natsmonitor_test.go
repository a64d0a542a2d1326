package server

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

// A "monitor" user of the client listener is in the same (global) account
// as fleetgate's own in-process client, whose replies (a KV get of a
// registry or session record, a pull consumer's messages) come to its
// inbox. The monitor may subscribe only to its own inbox prefix
// (_INBOX_<user>): _INBOX.> and fleetgate's prefix are refused, nothing
// fleetgate reads reaches it, and its own requests (stream names) work.
// (Review finding, test first written as TestReviewMonitorUserReadsNoRecordThroughInboxes.)
func TestMonitorUserReadsNoRecordThroughInboxes(t *testing.T) {
	users, err := readNATSUsers(writeUsers(t, "ops:0123456789abcdef:monitor\n", 0o600))
	if err != nil {
		t.Fatal(err)
	}
	c := natstest.StartWith(t, 3, func(i int, cfg *natsnode.Config) { cfg.ClientUsers = append(cfg.ClientUsers, users...) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The monitor, through the TLS client listener, tries every inbox.
	u := strings.Replace(c.Nodes[0].ClientURL(), "tls://", "tls://ops:0123456789abcdef@", 1)
	refused := make(chan string, 10)
	mon, err := nats.Connect(u, nats.RootCAs(c.CAFile), nats.MaxReconnects(0), nats.CustomInboxPrefix(MonitorInboxPrefix("ops")),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if strings.Contains(err.Error(), "ermissions violation") {
				refused <- err.Error()
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	const secret = "registry-record-only-fleetgate-reads"
	var leaked atomic.Int64
	for _, subj := range []string{"_INBOX.>", natsnode.InboxPrefix + ".>"} {
		if _, err := mon.Subscribe(subj, func(m *nats.Msg) {
			if strings.Contains(string(m.Data), secret) {
				leaked.Add(1)
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	_ = mon.Flush()
	for _, subj := range []string{"_INBOX.>", natsnode.InboxPrefix + ".>"} {
		select {
		case e := <-refused:
			if !strings.Contains(e, subj) {
				t.Errorf("refusal %q does not name %s", e, subj)
			}
		case <-ctx.Done():
			t.Fatalf("the monitor's subscription to %s was not refused", subj)
		}
	}
	// Its own requests, answered on its own prefix, work.
	mjs, err := jetstream.New(mon)
	if err != nil {
		t.Fatal(err)
	}
	names := mjs.StreamNames(ctx)
	for range names.Name() {
	}
	if err := names.Err(); err != nil {
		t.Fatalf("the monitor cannot list streams through its own inbox prefix: %v", err)
	}

	// fleetgate's own in-process client writes and reads a record.
	nc, err := c.Nodes[0].Connect("fleetgate-n0")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := natsnode.Bucket(ctx, js, "revsec")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "device.x", []byte(secret)); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if e, err := kv.Get(ctx, "device.x"); err != nil || string(e.Value()) != secret {
			t.Fatalf("fleetgate's own read: %v", err)
		}
	}
	_ = mon.Flush()
	// Any copy is the failure: wait a bounded while for one to arrive.
	for i := 0; i < 50 && leaked.Load() == 0; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if n := leaked.Load(); n > 0 {
		t.Fatalf("the monitor user read the record fleetgate's client got %d time(s)", n)
	}
}
