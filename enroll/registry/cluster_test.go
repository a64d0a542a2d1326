package registry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Registries of three cluster nodes: one bucket of the suite's 3-node
// JetStream cluster, each registry through its own NATS node, each with
// its own badger and directory (the cluster's feed is not part of these
// tests: cluster/dirfeed, e2e/cluster).
func clusterNodes(t *testing.T) []*Registry {
	t.Helper()
	if suite.name != "jetstream" {
		t.Skip("needs the JetStream pass")
	}
	n := newBucket()
	nodes := make([]*Registry, 3)
	for i := range nodes {
		r, err := Open(t.TempDir(), Options{Shared: sharedStore(t, n, i)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		nodes[i] = r
	}
	return nodes
}

var clusterSerial struct {
	sync.Mutex
	n int
}

func deviceCert(d fleet.Device) (*fleet.Certificate, error) {
	clusterSerial.Lock()
	clusterSerial.n++
	s := fmt.Sprintf("c1%06x", clusterSerial.n)
	clusterSerial.Unlock()
	now := time.Now()
	return &fleet.Certificate{Serial: s, Role: identity.RoleDevice, Name: d.ID, NotBefore: now, NotAfter: now.Add(time.Hour)}, nil
}

// enrollOn creates a token on one node and redeems it (audited) on another.
func enrollOn(t *testing.T, create, redeem *Registry, id string) *fleet.Certificate {
	t.Helper()
	secret := []byte("secret-" + id)
	if err := create.CreateToken(Token{ID: "tok-" + id, Hash: HashTokenSecret(secret), DeviceID: id, Group: "g", ExpiresAt: time.Now().Add(time.Hour)}, "op"); err != nil {
		t.Fatal(err)
	}
	c, err := redeem.RedeemTokenAudited("tok-"+id, secret, id, &AuditRecord{Actor: "device", Action: "enroll.token", DeviceID: id},
		func(tr TokenRedemption) (*fleet.Certificate, error) { return deviceCert(tr.Device) })
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A device enrolled through node 1 renews through node 2, is listed with
// its certificates through node 3, and its audit (written on nodes 1 and
// 2) is read through node 3 in commit order.
func TestClusterEnrolledOnOneRenewedOnAnotherListedAndAuditedOnAThird(t *testing.T) {
	n := clusterNodes(t)
	c1 := enrollOn(t, n[0], n[0], "dev-a")
	c2, err := n[1].RecordRenewal("dev-a", c1.Serial, deviceCert)
	if err != nil {
		t.Fatalf("renewal through node 2: %v", err)
	}
	n[1].Audit(AuditRecord{Actor: "device", Action: "renew", DeviceID: "dev-a", Outcome: OutcomeOK, Serial: c2.Serial})
	// The old certificate no longer renews, on any node.
	if _, err := n[2].RecordRenewal("dev-a", c1.Serial, deviceCert); !errors.Is(err, ErrRenewalTooSoon) {
		t.Fatalf("renewal from the superseded certificate through node 3: %v", err)
	}

	devs, err := n[2].Devices()
	if err != nil || len(devs) != 1 || devs[0].ID != "dev-a" || devs[0].CurrentSerial != c2.Serial || devs[0].State != fleet.StateActive {
		t.Fatalf("devices through node 3: %+v %v", devs, err)
	}
	for _, s := range []string{c1.Serial, c2.Serial} {
		if c, err := n[2].Certificate(s); err != nil || c.Name != "dev-a" {
			t.Fatalf("certificate %s through node 3: %+v %v", s, c, err)
		}
	}
	log, err := n[2].AuditLog("dev-a", 0)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, a := range log {
		actions = append(actions, a.Action)
	}
	if fmt.Sprint(actions) != "[token.create enroll.token renew]" || log[1].Serial != c1.Serial || log[2].Serial != c2.Serial {
		t.Fatalf("dev-a's audit through node 3: %+v", log)
	}
	for i := 1; i < len(log); i++ {
		if log[i].Seq <= log[i-1].Seq {
			t.Fatalf("audit sequence does not follow commit order: %+v", log)
		}
	}
	// Every node reads the same log.
	for i := range n {
		page, _, err := n[i].AuditPage(AuditQuery{Limit: 10})
		if err != nil || len(page) != 3 || page[0].Seq != log[2].Seq {
			t.Fatalf("audit page through node %d: %+v %v", i+1, page, err)
		}
	}
	// A revocation through node 3 refuses a renewal through node 1.
	if _, err := n[2].RevokeDevice("dev-a", "stolen", "op"); err != nil {
		t.Fatal(err)
	}
	if _, err := n[0].RecordRenewal("dev-a", c2.Serial, deviceCert); !errors.Is(err, ErrDeviceRevoked) {
		t.Fatalf("renewal of a device revoked through another node: %v", err)
	}
	if crl, err := n[1].RevokedCertificates(time.Now()); err != nil || len(crl) != 2 {
		t.Fatalf("CRL entries through node 2: %d %v", len(crl), err)
	}
}

// An EK registered through node 2 is honoured by a TPM enrollment through
// node 1 (the allow-list policy: an unregistered EK is refused there).
func TestClusterEKRegisteredOnOneNodeHonouredOnAnother(t *testing.T) {
	n := clusterNodes(t)
	if _, err := n[0].RedeemTPM(TPMRedemption{EKFingerprint: fp(7), DeviceID: "tpm-7"}, deviceCert); !errors.Is(err, ErrEKNotRegistered) {
		t.Fatalf("unregistered EK through node 1: %v", err)
	}
	if err := n[1].RegisterEK(EKRegistration{Fingerprint: fp(7), DeviceID: "tpm-7", Group: "lab"}, "op"); err != nil {
		t.Fatal(err)
	}
	if rec, dev, err := n[0].DeviceByEK(fp(7)); err != nil || rec.DeviceID != "tpm-7" || dev.State != fleet.StateRegistered {
		t.Fatalf("EK through node 1: %+v %+v %v", rec, dev, err)
	}
	c, err := n[0].RedeemTPM(TPMRedemption{EKFingerprint: fp(7), DeviceID: "tpm-7"}, deviceCert)
	if err != nil {
		t.Fatalf("TPM enrollment through node 1: %v", err)
	}
	d, err := n[2].Device("tpm-7")
	if err != nil || d.CurrentSerial != c.Serial || d.AttestationMethod != fleet.MethodTPM || d.Group != "lab" {
		t.Fatalf("device through node 3: %+v %v", d, err)
	}
	// A token for the TPM-bound device is refused on every node.
	if err := n[2].CreateToken(Token{ID: "tok-tpm-7", Hash: HashTokenSecret([]byte("s")), DeviceID: "tpm-7", ExpiresAt: time.Now().Add(time.Hour)}, "op"); !errors.Is(err, ErrTPMBound) {
		t.Fatalf("token for a TPM-bound device through node 3: %v", err)
	}
}

// Concurrent conflicting writes through different nodes: exactly one wins
// each time, and the others get the error their request deserves.
func TestClusterConcurrentConflictingWritesOneWinner(t *testing.T) {
	n := clusterNodes(t)
	race := func(k int, f func(node int) error) (wins int, errs []error) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for w := range k {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := f(w % len(n))
				mu.Lock()
				defer mu.Unlock()
				if err == nil {
					wins++
				} else {
					errs = append(errs, err)
				}
			}()
		}
		wg.Wait()
		return wins, errs
	}
	for round := range 4 {
		// One EK, registered for different devices on three nodes.
		ek := fp(1000 + round)
		wins, errs := race(3, func(i int) error {
			return n[i].RegisterEK(EKRegistration{Fingerprint: ek, DeviceID: fmt.Sprintf("ek%d-n%d", round, i)}, "op")
		})
		if wins != 1 {
			t.Fatalf("round %d: EK registered %d times: %v", round, wins, errs)
		}
		for _, err := range errs {
			if !errors.Is(err, ErrEKRegistered) {
				t.Fatalf("round %d: losing EK registration: %v", round, err)
			}
		}

		// One token, redeemed on three nodes at once.
		id := fmt.Sprintf("tok-dev-%d", round)
		secret := []byte("s")
		if err := n[round%3].CreateToken(Token{ID: "t-" + id, Hash: HashTokenSecret(secret), DeviceID: id, ExpiresAt: time.Now().Add(time.Hour)}, "op"); err != nil {
			t.Fatal(err)
		}
		wins, errs = race(3, func(i int) error {
			_, err := n[i].RedeemToken("t-"+id, secret, id, func(tr TokenRedemption) (*fleet.Certificate, error) { return deviceCert(tr.Device) })
			return err
		})
		if wins != 1 {
			t.Fatalf("round %d: token redeemed %d times: %v", round, wins, errs)
		}
		for _, err := range errs {
			if !errors.Is(err, ErrTokenUsed) && !errors.Is(err, ErrConflict) {
				t.Fatalf("round %d: losing redemption: %v", round, err)
			}
		}

		// One device's current certificate, renewed on three nodes.
		d, err := n[0].Device(id)
		if err != nil {
			t.Fatal(err)
		}
		wins, errs = race(3, func(i int) error {
			_, err := n[i].RecordRenewal(id, d.CurrentSerial, deviceCert)
			return err
		})
		if wins != 1 {
			t.Fatalf("round %d: one certificate renewed %d times: %v", round, wins, errs)
		}
		for _, err := range errs {
			if !errors.Is(err, ErrRenewalTooSoon) {
				t.Fatalf("round %d: losing renewal: %v", round, err)
			}
		}
		var serials []string
		if err := n[2].view(func(txn txn) error { var err error; serials, err = deviceSerials(txn, id); return err }); err != nil || len(serials) != 2 {
			t.Fatalf("round %d: %s holds %v (%v), want 2 certificates", round, id, serials, err)
		}
	}
}

// A node's records from before it joined a cluster (the single box's
// badger: init's operator certificate, enrolled devices, EKs, audit) are
// copied into the cluster's store once, where it lacks them, and read
// through the other nodes; data directories copied from one init do not
// duplicate them.
func TestClusterSeedCopiesTheNodesOwnRecordsOnce(t *testing.T) {
	if suite.name != "jetstream" {
		t.Skip("needs the JetStream pass")
	}
	dir := t.TempDir()
	single, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := enrollOn(t, single, single, "old-dev")
	if err := single.RegisterEK(EKRegistration{Fingerprint: fp(9), DeviceID: "old-tpm"}, "op"); err != nil {
		t.Fatal(err)
	}
	if err := single.RecordCertificate(&fleet.Certificate{Serial: "0a0b", Role: identity.RoleOperator, Name: "admin", NotAfter: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	oldLog, _ := single.AuditLog("", 0)
	single.Close()

	b := newBucket()
	var nodes []*Registry
	for i := range 2 { // two nodes joined with copies of one data directory
		d := dir
		if i == 1 {
			d = t.TempDir()
			copyDir(t, dir, d)
		}
		r, err := Open(d, Options{Shared: sharedStore(t, b, i), DirectoryFed: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if st, ok := r.DeviceStatus("old-dev"); !ok || st.State != fleet.StateActive {
			t.Fatalf("node %d: the directory lacks its own records: %+v", i, st)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		w, err := r.SeedShared(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 && w != 0 {
			t.Fatalf("the second copy wrote %d records again", w)
		}
		nodes = append(nodes, r)
	}
	third, err := Open(t.TempDir(), Options{Shared: sharedStore(t, b, 2)})
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	if d, err := third.Device("old-dev"); err != nil || d.CurrentSerial != c.Serial {
		t.Fatalf("old device through another node: %+v %v", d, err)
	}
	if rec, _, err := third.DeviceByEK(fp(9)); err != nil || rec.DeviceID != "old-tpm" {
		t.Fatalf("old EK through another node: %+v %v", rec, err)
	}
	if ops, err := third.PrincipalCertificates(identity.RoleOperator, "admin"); err != nil || len(ops) != 1 {
		t.Fatalf("init's operator certificate through another node: %+v %v", ops, err)
	}
	newLog, err := third.AuditLog("", 0)
	if err != nil || len(newLog) != len(oldLog) {
		t.Fatalf("audit through another node: %d records, want %d (%v)", len(newLog), len(oldLog), err)
	}
	// It renews through another node, and a second seeding is a no-op.
	if _, err := third.RecordRenewal("old-dev", c.Serial, deviceCert); err != nil {
		t.Fatal(err)
	}
	if w, err := nodes[0].SeedShared(context.Background()); err != nil || w != 0 {
		t.Fatalf("second seeding: %d %v", w, err)
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
