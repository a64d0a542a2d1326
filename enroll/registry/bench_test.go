package registry

import (
	"fmt"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
)

// BenchmarkTokenEnrollment: a token created and redeemed (audited), the
// token, certificate, device, index and audit records committed; on each
// pass's backend (badger; a 3-node JetStream cluster, syncing before it
// acknowledges). go test -run '^$' -bench TokenEnrollment -benchtime 200x
func BenchmarkTokenEnrollment(b *testing.B) {
	r, err := open(b, b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("bench-%d", i)
		secret := []byte("s")
		if err := r.CreateToken(Token{ID: "t" + id, Hash: HashTokenSecret(secret), DeviceID: id, ExpiresAt: time.Now().Add(time.Hour)}, "op"); err != nil {
			b.Fatal(err)
		}
		if _, err := r.RedeemTokenAudited("t"+id, secret, id, &AuditRecord{Actor: "device", Action: "enroll.token", DeviceID: id},
			func(tr TokenRedemption) (*fleet.Certificate, error) { return deviceCert(tr.Device) }); err != nil {
			b.Fatal(err)
		}
	}
}
