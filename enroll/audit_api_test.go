package enroll_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestAuditAPIPagesNewestFirst: the admin API returns the audit log newest
// first in pages with a cursor; pages are disjoint and complete; the device
// filter returns only that device's records.
func TestAuditAPIPagesNewestFirst(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	for i := range 24 {
		g.Token(t, fmt.Sprintf("dev-%d", i%4), "lab", time.Hour) // a token.create record each
	}
	first, err := g.Admin.AuditPage(ctx, "", 5, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Records) != 5 || first.Next == "" {
		t.Fatalf("first page: %d records, next %q", len(first.Records), first.Next)
	}
	for i := 1; i < 5; i++ {
		if first.Records[i].Seq >= first.Records[i-1].Seq {
			t.Fatalf("not newest first: %d after %d", first.Records[i].Seq, first.Records[i-1].Seq)
		}
	}
	if a := first.Records[0]; a.Action != "token.create" || a.DeviceID != "dev-3" {
		t.Fatalf("newest record is %+v, want the last token.create (dev-3)", a)
	}

	seen := map[uint64]bool{}
	var last uint64
	total, cursor := 0, ""
	for pages := 0; ; pages++ {
		if pages > 100 {
			t.Fatal("paging does not end")
		}
		p, err := g.Admin.AuditPage(ctx, "", 7, cursor)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range p.Records {
			if seen[a.Seq] || (last != 0 && a.Seq >= last) {
				t.Fatalf("seq %d repeated or out of order", a.Seq)
			}
			seen[a.Seq], last = true, a.Seq
			total++
		}
		if p.Next == "" {
			break
		}
		cursor = p.Next
	}
	all, err := g.Admin.Audit(ctx, "", 0)
	if err != nil || len(all) != total || total < 25 {
		t.Fatalf("pages hold %d records, the whole log %d (%v)", total, len(all), err)
	}

	dev, err := g.Admin.Audit(ctx, "dev-1", 0)
	if err != nil || len(dev) != 6 {
		t.Fatalf("dev-1: %d records, want its 6 token.create (%v)", len(dev), err)
	}
	for _, a := range dev {
		if a.DeviceID != "dev-1" {
			t.Fatalf("device filter returned %+v", a)
		}
	}
	if _, err := g.Admin.AuditPage(ctx, "", 5, "nope"); !isCode(err, "invalid_cursor") {
		t.Errorf("malformed cursor: %v", err)
	}
	if _, err := g.Admin.AuditPage(ctx, "Not_A/Device", 5, ""); !isCode(err, "invalid_device_id") {
		t.Errorf("invalid device: %v", err)
	}
}
