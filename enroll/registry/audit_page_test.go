package registry

import (
	"fmt"
	"strings"
	"testing"

	badger "github.com/dgraph-io/badger/v4"
)

// fillAudit writes n records, one in every 500 for dev-b, the rest spread
// over dev-a and no device, in batches; it returns the sequence numbers of
// dev-b's records and of all records, oldest first.
func fillAudit(t *testing.T, r *Registry, n int) (devB, all []uint64) {
	t.Helper()
	for i := range n {
		a := AuditRecord{Actor: "device", Action: "enroll.token", Outcome: OutcomeDenied, Reason: fmt.Sprintf("r%d", i)}
		switch {
		case i%500 == 7:
			a.DeviceID = "dev-b"
		case i%2 == 0:
			a.DeviceID = "dev-a"
		}
		r.AuditBatched(a)
		if i%1000 == 999 {
			r.flushAudit() // stay under MaxAuditQueue
		}
	}
	r.flushAudit()
	log, err := r.AuditLog("", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range log {
		all = append(all, a.Seq)
		if a.DeviceID == "dev-b" {
			devB = append(devB, a.Seq)
		}
	}
	if len(all) != n {
		t.Fatalf("%d records written, %d read", n, len(all))
	}
	return devB, all
}

// TestAuditPageReadsOnlyItsPage: after many records, the newest five cost
// about five key reads, newest first; pages are disjoint and complete; the
// device filter reads that device's records only.
func TestAuditPageReadsOnlyItsPage(t *testing.T) {
	r := openTest(t)
	const n = 6000
	devB, all := fillAudit(t, r, n)

	before := r.AuditKeysRead()
	page, next, err := r.AuditPage(AuditQuery{Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	if read := r.AuditKeysRead() - before; read > 6 {
		t.Fatalf("reading 5 of %d records read %d keys", n, read)
	}
	if len(page) != 5 || next == "" {
		t.Fatalf("page of %d, next %q", len(page), next)
	}
	for i, a := range page {
		if a.Seq != all[len(all)-1-i] {
			t.Fatalf("record %d of the page is seq %d, want %d (newest first)", i, a.Seq, all[len(all)-1-i])
		}
	}

	// Paging through everything: disjoint, complete, newest first.
	seen := map[uint64]bool{}
	var order []uint64
	cursor := ""
	for pages := 0; ; pages++ {
		if pages > n/997+2 {
			t.Fatal("paging does not end")
		}
		before := r.AuditKeysRead()
		p, nx, err := r.AuditPage(AuditQuery{Limit: 997, Cursor: cursor})
		if err != nil {
			t.Fatal(err)
		}
		if read := r.AuditKeysRead() - before; read > 998 {
			t.Fatalf("a page of 997 read %d keys", read)
		}
		for _, a := range p {
			if seen[a.Seq] {
				t.Fatalf("seq %d on two pages", a.Seq)
			}
			seen[a.Seq] = true
			order = append(order, a.Seq)
		}
		if nx == "" {
			break
		}
		cursor = nx
	}
	if len(order) != n {
		t.Fatalf("pages hold %d of %d records", len(order), n)
	}
	for i := range order {
		if order[i] != all[len(all)-1-i] {
			t.Fatalf("paged order differs at %d", i)
		}
	}

	// Device filter: only dev-b's records, reading their index keys and
	// records, never the others'.
	before = r.AuditKeysRead()
	got, nx, err := r.AuditPage(AuditQuery{DeviceID: "dev-b", Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if read := r.AuditKeysRead() - before; read > uint64(2*len(devB)) {
		t.Fatalf("filtering %d of %d records read %d keys", len(devB), n, read)
	}
	if nx != "" || len(got) != len(devB) {
		t.Fatalf("dev-b: %d records (next %q), want %d", len(got), nx, len(devB))
	}
	for i, a := range got {
		if a.DeviceID != "dev-b" || a.Seq != devB[len(devB)-1-i] {
			t.Fatalf("dev-b page holds %+v", a)
		}
	}
	// Device pages are disjoint and complete too.
	half := len(devB) / 2
	p1, c1, _ := r.AuditPage(AuditQuery{DeviceID: "dev-b", Limit: half})
	p2, c2, _ := r.AuditPage(AuditQuery{DeviceID: "dev-b", Limit: len(devB), Cursor: c1})
	if len(p1) != half || len(p2) != len(devB)-half || c2 != "" || p2[0].Seq >= p1[half-1].Seq {
		t.Fatalf("device pages: %d + %d of %d, cursors %q %q", len(p1), len(p2), len(devB), c1, c2)
	}

	if _, _, err := r.AuditPage(AuditQuery{Cursor: "x"}); err != ErrAuditCursor {
		t.Fatalf("malformed cursor: %v", err)
	}
}

// TestAuditDeviceIndexBuiltForOldRecords: records written before the device
// index existed are indexed when the registry opens.
func TestAuditDeviceIndexBuiltForOldRecords(t *testing.T) {
	onlyBadger(t)
	dir := t.TempDir()
	r, err := open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	devB, _ := fillAudit(t, r, 1200)
	// As an older version left it: no index, no marker.
	if err := r.db.DropPrefix([]byte(pfxAuditDev)); err != nil {
		t.Fatal(err)
	}
	if err := r.db.Update(func(txn *badger.Txn) error { return txn.Delete([]byte(metaAuditDev)) }); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := r.AuditPage(AuditQuery{DeviceID: "dev-b"}); len(got) != 0 {
		t.Fatalf("index not dropped: %d", len(got))
	}
	r.Close()
	r, err = open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, _, err := r.AuditPage(AuditQuery{DeviceID: "dev-b"})
	if err != nil || len(got) != len(devB) {
		t.Fatalf("after reopening: %d records of dev-b, want %d (%v)", len(got), len(devB), err)
	}
}

// TestAuditBatchedIsBoundedAndWrittenInBatches: queued records are written
// in far fewer transactions than records, survive Close, and fields a peer
// chose are bounded.
func TestAuditBatchedIsBoundedAndWrittenInBatches(t *testing.T) {
	dir := t.TempDir()
	r, err := open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	huge := strings.Repeat("\x00A", 32<<10)
	for range 1000 {
		r.AuditBatched(AuditRecord{Actor: huge, Action: "enroll.token", DeviceID: huge, Outcome: OutcomeDenied, Reason: huge, Remote: huge})
	}
	r.Close()
	if b := r.AuditBatches(); b == 0 || b > 100 {
		t.Fatalf("1000 records written in %d batches", b)
	}
	r, err = open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	log, err := r.AuditLog("", 0)
	if err != nil || len(log) != 1000 {
		t.Fatalf("%d records after reopening (%v)", len(log), err)
	}
	a := log[0]
	if n := len(a.Actor) + len(a.Reason) + len(a.Remote) + len(a.DeviceID); n > 2*maxAuditReason || a.DeviceID != "" || strings.Contains(a.Reason, "\x00") {
		t.Fatalf("a record of 4 x 64 KiB fields holds %d bytes: %.80q", n, a.Reason)
	}
}
