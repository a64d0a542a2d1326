package registry

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// blockingSigner is a CA key that takes as long as the test wants: a slow
// HSM or TPM. Sign reports that it started and waits for release.
type blockingSigner struct {
	crypto.Signer
	started chan struct{}
	release chan struct{}
}

func (s *blockingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	close(s.started)
	<-s.release
	return s.Signer.Sign(r, digest, opts)
}

// slowCA signs device certificates with a blockingSigner.
func slowCA(t *testing.T) (sign func(TokenRedemption) (*fleet.Certificate, error), s *blockingSigner) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "slow CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	s = &blockingSigner{Signer: key, started: make(chan struct{}), release: make(chan struct{})}
	return func(tr TokenRedemption) (*fleet.Certificate, error) {
		serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
		if err != nil {
			return nil, err
		}
		id := identity.Identity{Role: identity.RoleDevice, Name: tr.Device.ID}
		tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), s)
		if err != nil {
			return nil, err
		}
		return &fleet.Certificate{Serial: fleet.SerialString(tmpl.SerialNumber), Role: id.Role, Name: id.Name,
			NotBefore: tmpl.NotBefore, NotAfter: tmpl.NotAfter, DER: der}, nil
	}, s
}

type redeemed struct {
	c   *fleet.Certificate
	err error
}

// startSlowRedemption redeems a new token for id with a signer that blocks,
// and returns once the signature is in progress.
func startSlowRedemption(t *testing.T, r *Registry, id string) (<-chan redeemed, *blockingSigner) {
	t.Helper()
	secret := []byte("slow-secret-" + id)
	tokID := "slow-tok-" + id
	if err := r.CreateToken(Token{ID: tokID, Hash: HashTokenSecret(secret), DeviceID: id, Group: "g", ExpiresAt: time.Now().Add(time.Hour)}, "test"); err != nil {
		t.Fatal(err)
	}
	sign, s := slowCA(t)
	done := make(chan redeemed, 1)
	go func() {
		c, err := r.RedeemToken(tokID, secret, id, sign)
		done <- redeemed{c, err}
	}()
	<-s.started
	return done, s
}

// A slow CA key does not hold the fleet back: while a signature is in
// progress, a revocation of another device completes (and so does another
// enrollment), and the slow enrollment then completes too.
func TestRevocationCompletesWhileASignatureIsInProgress(t *testing.T) {
	r := openTest(t)
	enrollTestDevice(t, r, "other", 2)
	done, s := startSlowRedemption(t, r, "slow")

	serials, err := r.RevokeDevice("other", "compromised", "op")
	if err != nil || len(serials) != 2 {
		t.Fatalf("revoke while signing: %v %v", serials, err)
	}
	if st, _ := r.DeviceStatus("other"); st.State != fleet.StateRevoked {
		t.Fatalf("revoked device is %s", st.State)
	}
	enrollTestDevice(t, r, "quick", 1)
	select {
	case res := <-done:
		t.Fatalf("the slow enrollment finished before its signer was released: %+v", res)
	default: // the signer is still blocked: the revocation did not wait for it
	}

	close(s.release)
	res := <-done
	if res.err != nil {
		t.Fatalf("slow enrollment: %v", res.err)
	}
	if st, ok := r.CertStatus(res.c.Serial); !ok || st.Revoked {
		t.Fatalf("slow enrollment not recorded before it returned: %+v %v", st, ok)
	}
}

// The commit after a slow signature checks again: a device revoked, or a
// token used, while its certificate was being signed gets nothing, and
// nothing is recorded.
func TestRevocationDuringASignatureWins(t *testing.T) {
	r := openTest(t)
	enrollTestDevice(t, r, "victim", 1)
	done, s := startSlowRedemption(t, r, "victim")
	if _, err := r.RevokeDevice("victim", "stolen", "op"); err != nil {
		t.Fatal(err)
	}
	close(s.release)
	res := <-done
	if !errors.Is(res.err, ErrDeviceRevoked) || res.c != nil {
		t.Fatalf("enrollment of a device revoked during signing: %+v", res)
	}
	d, err := r.Device("victim")
	if err != nil || d.State != fleet.StateRevoked {
		t.Fatalf("device %+v %v", d, err)
	}
	if n := len(mustSerials(t, r, "victim")); n != 1 {
		t.Fatalf("%d certificates recorded, want the first one only", n)
	}
}

// While a token's redemption is signing, a second redemption of the same
// token is refused before it signs.
func TestTokenRedeemedOnceWhileSigning(t *testing.T) {
	r := openTest(t)
	done, s := startSlowRedemption(t, r, "twice")
	_, err := r.RedeemToken("slow-tok-twice", []byte("slow-secret-twice"), "twice", func(TokenRedemption) (*fleet.Certificate, error) {
		t.Error("second redemption signed")
		return nil, fmt.Errorf("no")
	})
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("second redemption during the first's signature: %v", err)
	}
	close(s.release)
	if res := <-done; res.err != nil {
		t.Fatal(res.err)
	}
	_, err = r.RedeemToken("slow-tok-twice", []byte("slow-secret-twice"), "twice", func(TokenRedemption) (*fleet.Certificate, error) {
		t.Error("redemption of a used token signed")
		return nil, fmt.Errorf("no")
	})
	if !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("redemption of a used token: %v", err)
	}
}

func mustSerials(t *testing.T, r *Registry, id string) []string {
	t.Helper()
	var out []string
	if err := r.view(func(txn txn) error {
		var err error
		out, err = deviceSerials(txn, id)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}
