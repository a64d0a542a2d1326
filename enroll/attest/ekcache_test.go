package attest_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/attest"
)

func TestEKCacheRemembersOnlyWhatVerified(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	other := newSWPKI(t)
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	good := pki.ekCert(t, &ekKey.PublicKey, nil)

	t.Run("a verified certificate is remembered and answered from the cache", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 8)
		first, err := c.Verify(good, testNow)
		if err != nil {
			t.Fatal(err)
		}
		if c.Len() != 1 {
			t.Fatalf("Len = %d after one verification, want 1", c.Len())
		}
		again, err := c.Verify(good, testNow.Add(30*time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		if again != first {
			t.Fatal("the second verification was not answered from the cache")
		}
	})

	t.Run("a remembered certificate is refused once it has expired, and forgotten", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 8)
		if _, err := c.Verify(good, testNow); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Verify(good, testNow.Add(2*time.Hour)); !errors.Is(err, attest.ErrEKChainInvalid) {
			t.Fatalf("expired EK certificate from the cache: %v, want ErrEKChainInvalid", err)
		}
		if c.Len() != 0 {
			t.Fatalf("Len = %d after the certificate expired, want 0", c.Len())
		}
	})

	t.Run("a remembered certificate is refused before it is valid", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 8)
		if _, err := c.Verify(good, testNow); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Verify(good, testNow.Add(-2*time.Hour)); !errors.Is(err, attest.ErrEKChainInvalid) {
			t.Fatalf("not yet valid EK certificate from the cache: %v, want ErrEKChainInvalid", err)
		}
	})

	t.Run("a remembered certificate is refused once its root has expired", func(t *testing.T) {
		// The EK certificate outlives the root (root valid until testNow+24h).
		long := pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) { c.NotAfter = testNow.Add(72 * time.Hour) })
		c := attest.NewEKCache(pki.roots, nil, 8)
		if _, err := c.Verify(long, testNow); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Verify(long, testNow.Add(48*time.Hour)); !errors.Is(err, attest.ErrEKChainInvalid) {
			t.Fatalf("EK certificate under an expired root from the cache: %v, want ErrEKChainInvalid", err)
		}
	})

	t.Run("another certificate for the same key is verified in full", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 8)
		if _, err := c.Verify(good, testNow); err != nil {
			t.Fatal(err)
		}
		for name, der := range map[string][]byte{
			"from an unknown manufacturer": other.ekCert(t, &ekKey.PublicKey, nil),
			"a CA certificate": pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.IsCA = true
				c.KeyUsage |= x509.KeyUsageCertSign
			}),
			"with a TLS extended key usage": pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.UnknownExtKeyUsage = nil
				c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			}),
			"expired": pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.NotAfter = testNow.Add(-time.Minute)
			}),
		} {
			if _, err := c.Verify(der, testNow); !errors.Is(err, attest.ErrEKChainInvalid) {
				t.Errorf("%s: %v, want ErrEKChainInvalid", name, err)
			}
		}
		if c.Len() != 1 {
			t.Fatalf("Len = %d: a refused certificate was remembered", c.Len())
		}
	})

	t.Run("failures are not remembered and give the uncached errors", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 8)
		p224Key, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
		for _, tc := range []struct {
			der  []byte
			want error
		}{
			{[]byte("garbage"), attest.ErrMalformed},
			{nil, attest.ErrMalformed},
			{append(append([]byte(nil), good...), 0), attest.ErrMalformed},
			{pki.ekCert(t, &p224Key.PublicKey, nil), attest.ErrKeyType},
		} {
			for range 2 {
				if _, err := c.Verify(tc.der, testNow); !errors.Is(err, tc.want) {
					t.Errorf("%v, want %v", err, tc.want)
				}
			}
		}
		if c.Len() != 0 {
			t.Fatalf("Len = %d after failures only", c.Len())
		}
	})

	t.Run("without roots everything is refused", func(t *testing.T) {
		c := attest.NewEKCache(nil, nil, 8)
		if _, err := c.Verify(good, testNow); !errors.Is(err, attest.ErrEKChainInvalid) {
			t.Fatalf("no roots: %v, want ErrEKChainInvalid", err)
		}
	})

	t.Run("the cache is bounded", func(t *testing.T) {
		c := attest.NewEKCache(pki.roots, nil, 3)
		var ders [][]byte
		for i := range 10 {
			der := pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) { c.SerialNumber = big.NewInt(int64(100 + i)) })
			ders = append(ders, der)
			if _, err := c.Verify(der, testNow); err != nil {
				t.Fatal(err)
			}
			if c.Len() > 3 {
				t.Fatalf("Len = %d, bound 3", c.Len())
			}
		}
		for _, der := range ders {
			if _, err := c.Verify(der, testNow); err != nil {
				t.Fatalf("a certificate forgotten by the bound does not verify again: %v", err)
			}
		}
	})
}

// An EK certificate issued by an intermediate: the cache keeps the validity
// of the whole chain, the intermediate's included.
func TestEKCacheChecksTheIntermediatesValidity(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	ik, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	itmpl := &x509.Certificate{
		SerialNumber: big.NewInt(10), Subject: pkix.Name{CommonName: "sw TPM intermediate"},
		NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(2 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	ider, err := x509.CreateCertificate(rand.Reader, itmpl, pki.root, ik.Public(), pki.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(ider)
	ipool := x509.NewCertPool()
	ipool.AddCert(inter)
	sub := &swPKI{root: inter, rootKey: ik}
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der := sub.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) { c.NotAfter = testNow.Add(10 * time.Hour) })

	c := attest.NewEKCache(pki.roots, ipool, 8)
	if _, err := c.Verify(der, testNow); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Verify(der, testNow.Add(time.Hour)); err != nil {
		t.Fatalf("within the intermediate's validity: %v", err)
	}
	if _, err := c.Verify(der, testNow.Add(3*time.Hour)); !errors.Is(err, attest.ErrEKChainInvalid) {
		t.Fatalf("after the intermediate expired: %v, want ErrEKChainInvalid", err)
	}
	// Without the intermediate pool the certificate does not chain.
	if _, err := attest.NewEKCache(pki.roots, nil, 8).Verify(der, testNow); !errors.Is(err, attest.ErrEKChainInvalid) {
		t.Fatalf("without the intermediate: %v, want ErrEKChainInvalid", err)
	}
}
