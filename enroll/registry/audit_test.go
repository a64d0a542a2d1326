package registry

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// auditSeqs returns the sequence numbers of the whole audit log, in order.
func auditSeqs(t *testing.T, r *Registry) []uint64 {
	t.Helper()
	log, err := r.AuditLog("", 0)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]uint64, len(log))
	for i, a := range log {
		out[i] = a.Seq
	}
	return out
}

// checkContiguous: on badger the sequence numbers are from, from+1, ...;
// on a cluster's store (revisions of a stream shared by every record) they
// only increase.
func checkContiguous(t *testing.T, seqs []uint64, from uint64) {
	t.Helper()
	if suite.name != "badger" {
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				t.Fatalf("audit sequence %v does not increase", seqs)
			}
		}
		return
	}
	for i, s := range seqs {
		if s != from+uint64(i) {
			t.Fatalf("audit sequence %v: want %d, %d, ...", seqs, from, from+1)
		}
	}
}

func TestAuditedRedemptionWritesItsRecordInTheIssuingTransaction(t *testing.T) {
	r := openTest(t)
	if err := r.RegisterEK(EKRegistration{Fingerprint: fp(1), DeviceID: "dev-1", Group: "lab"}, "op"); err != nil {
		t.Fatal(err)
	}
	if err := r.RegisterEK(EKRegistration{Fingerprint: fp(2), DeviceID: "dev-2", Group: "lab"}, "op"); err != nil {
		t.Fatal(err)
	}
	setState(t, r, "dev-2", fleet.StateRevoked)
	before := len(auditSeqs(t, r))

	var called bool
	c, err := r.RedeemTPM(TPMRedemption{EKFingerprint: fp(1), DeviceID: "dev-1",
		Audit: &AuditRecord{Actor: "device", Action: "enroll.tpm", DeviceID: "dev-1", Remote: "192.0.2.1:1"}}, signer(t, &called))
	if err != nil {
		t.Fatal(err)
	}
	log, err := r.AuditLog("dev-1", 0)
	if err != nil {
		t.Fatal(err)
	}
	last := log[len(log)-1]
	if last.Action != "enroll.tpm" || last.Outcome != OutcomeOK || last.Serial != c.Serial || last.Remote != "192.0.2.1:1" || last.Time.IsZero() {
		t.Fatalf("audit record of the enrollment: %+v (serial %s)", last, c.Serial)
	}

	// A refused redemption writes no record of its own (the caller audits
	// the refusal) and issues nothing.
	called = false
	if _, err := r.RedeemTPM(TPMRedemption{EKFingerprint: fp(2), DeviceID: "dev-2",
		Audit: &AuditRecord{Actor: "device", Action: "enroll.tpm", DeviceID: "dev-2"}}, signer(t, &called)); !errors.Is(err, ErrDeviceRevoked) {
		t.Fatalf("revoked device: %v", err)
	}
	if called {
		t.Fatal("a refused redemption signed")
	}
	if log, _ := r.AuditLog("dev-2", 0); len(log) != 1 || log[0].Action != "ek.register" {
		t.Fatalf("a refused redemption audited: %+v", log)
	}
	if n := len(auditSeqs(t, r)); n != before+1 {
		t.Fatalf("%d audit records after one enrollment, want %d", n, before+1)
	}
	checkContiguous(t, auditSeqs(t, r), 0)
}

func TestAuditedTokenRedemption(t *testing.T) {
	r := openTest(t)
	secret := []byte("s")
	if err := r.CreateToken(Token{ID: "t1", Hash: HashTokenSecret(secret), DeviceID: "dev-t", Group: "g", ExpiresAt: time.Now().Add(time.Hour)}, "op"); err != nil {
		t.Fatal(err)
	}
	sign := func(TokenRedemption) (*fleet.Certificate, error) {
		return &fleet.Certificate{Serial: "7a", Role: identity.RoleDevice, Name: "dev-t", NotAfter: time.Now().Add(time.Hour)}, nil
	}
	audit := &AuditRecord{Actor: "device", Action: "enroll.token", DeviceID: "dev-t"}
	if _, err := r.RedeemTokenAudited("t1", secret, "dev-t", audit, sign); err != nil {
		t.Fatal(err)
	}
	if _, err := r.RedeemTokenAudited("t1", secret, "dev-t", audit, sign); !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("second redemption: %v", err)
	}
	log, _ := r.AuditLog("dev-t", 0)
	if len(log) != 2 || log[0].Action != "token.create" || log[1].Action != "enroll.token" || log[1].Serial != "7a" || log[1].Outcome != OutcomeOK {
		t.Fatalf("audit log: %+v", log)
	}
	if audit.Serial != "" || audit.Seq != 0 {
		t.Fatalf("the caller's record was modified: %+v", audit)
	}
	checkContiguous(t, auditSeqs(t, r), 0)
}

func TestAuditSequenceSurvivesRestartWithoutReuse(t *testing.T) {
	dir := t.TempDir()
	r, err := open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		r.Audit(AuditRecord{Actor: "op", Action: fmt.Sprintf("a%d", i), Outcome: OutcomeOK})
	}
	r.Close()

	r, err = open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	r.Audit(AuditRecord{Actor: "op", Action: "after-restart", Outcome: OutcomeOK})
	seqs := auditSeqs(t, r)
	if len(seqs) != 6 {
		t.Fatalf("%d records, want 6", len(seqs))
	}
	checkContiguous(t, seqs, 0)
	if suite.name != "badger" {
		r.Close()
		return // the rest is badger's stored sequence number
	}

	// A stored next number ahead of the log (a lease of the badger.Sequence
	// earlier versions used) is respected: numbers are never reused.
	if err := r.db.Update(func(txn *badger.Txn) error {
		v := make([]byte, 8)
		binary.BigEndian.PutUint64(v, 100)
		return txn.Set([]byte(seqAudit), v)
	}); err != nil {
		t.Fatal(err)
	}
	r.Close()
	r, err = open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	r.Audit(AuditRecord{Actor: "op", Action: "after-lease", Outcome: OutcomeOK})
	seqs = auditSeqs(t, r)
	if got := seqs[len(seqs)-1]; got != 100 {
		t.Fatalf("after a stored next number of 100, the record got %d", got)
	}

	// A stored next number behind the log (lost, or older) is not trusted
	// over the last record.
	if err := r.db.Update(func(txn *badger.Txn) error {
		v := make([]byte, 8)
		binary.BigEndian.PutUint64(v, 3)
		return txn.Set([]byte(seqAudit), v)
	}); err != nil {
		t.Fatal(err)
	}
	r.Close()
	r, err = open(t, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	r.Audit(AuditRecord{Actor: "op", Action: "after-stale", Outcome: OutcomeOK})
	seqs = auditSeqs(t, r)
	if got := seqs[len(seqs)-1]; got != 101 {
		t.Fatalf("after the last record 100, the record got %d", got)
	}
}
