package attest

import (
	"crypto/x509"
	"sync"
	"time"
)

// DefaultEKCacheSize is the number of EK certificates an EKCache remembers
// by default. An entry holds the certificate's bytes (at most
// MaxEKCertSize, typically 1-2 KiB) and its parsed form.
const DefaultEKCacheSize = 1024

// EKCache verifies EK certificates exactly as
// VerifyEKCertificateWithIntermediates does, against pools fixed at
// construction, and remembers the certificates that verified, so that a
// device enrolling again with the same EK certificate is not parsed and
// chain-verified again.
//
// A remembered result is used only for exactly the same certificate bytes
// (the whole DER is the key: another certificate, even for the same key, is
// verified in full), and only while the current time is within the validity
// period of every certificate of one of the chains it verified with (leaf,
// intermediates and root). Everything else Verify checks depends only on the
// bytes and the pools. Outside that period, and on every failure, the
// certificate is verified in full; failures are not remembered. At most size
// certificates are remembered; when full, an arbitrary one is forgotten.
//
// The pools must not change after NewEKCache (certificates added with
// AddCertWithConstraint are not supported). The returned certificates are
// shared between callers and must not be modified. Safe for concurrent use.
type EKCache struct {
	roots, intermediates *x509.CertPool
	size                 int

	mu sync.Mutex
	m  map[string]*ekCacheEntry
}

type ekCacheEntry struct {
	cert *x509.Certificate
	// windows are the validity periods of the verified chains: the latest
	// notBefore and the earliest notAfter of each chain's certificates.
	windows []validity
}

type validity struct{ notBefore, notAfter time.Time }

// validAt reports whether some verified chain is valid at t, by the rule of
// crypto/x509 (valid from notBefore to notAfter, both included).
func (e *ekCacheEntry) validAt(t time.Time) bool {
	for _, w := range e.windows {
		if !t.Before(w.notBefore) && !t.After(w.notAfter) {
			return true
		}
	}
	return false
}

// NewEKCache returns an EKCache for roots (the TPM manufacturer roots; nil
// refuses every certificate, as VerifyEKCertificate does) and intermediates
// (may be nil), remembering at most size certificates (DefaultEKCacheSize if
// size <= 0).
func NewEKCache(roots, intermediates *x509.CertPool, size int) *EKCache {
	if size <= 0 {
		size = DefaultEKCacheSize
	}
	return &EKCache{roots: roots, intermediates: intermediates, size: size, m: make(map[string]*ekCacheEntry)}
}

// Verify is VerifyEKCertificateWithIntermediates(ekDER, roots,
// intermediates, now), answered from the cache when ekDER verified before
// and one of its chains is valid at now.
func (c *EKCache) Verify(ekDER []byte, now time.Time) (*x509.Certificate, error) {
	if c.roots == nil || len(ekDER) == 0 || len(ekDER) > MaxEKCertSize {
		cert, _, err := verifyEK(ekDER, c.roots, c.intermediates, now)
		return cert, err
	}
	c.mu.Lock()
	e := c.m[string(ekDER)]
	c.mu.Unlock()
	if e != nil && e.validAt(now) {
		return e.cert, nil
	}
	cert, chains, err := verifyEK(ekDER, c.roots, c.intermediates, now)
	if err != nil {
		if e != nil {
			c.mu.Lock()
			if c.m[string(ekDER)] == e {
				delete(c.m, string(ekDER))
			}
			c.mu.Unlock()
		}
		return nil, err
	}
	ne := &ekCacheEntry{cert: cert, windows: make([]validity, 0, len(chains))}
	for _, chain := range chains {
		if len(chain) == 0 {
			continue
		}
		w := validity{notBefore: chain[0].NotBefore, notAfter: chain[0].NotAfter}
		for _, ca := range chain[1:] {
			if ca.NotBefore.After(w.notBefore) {
				w.notBefore = ca.NotBefore
			}
			if ca.NotAfter.Before(w.notAfter) {
				w.notAfter = ca.NotAfter
			}
		}
		ne.windows = append(ne.windows, w)
	}
	c.mu.Lock()
	if _, ok := c.m[string(ekDER)]; !ok && len(c.m) >= c.size {
		for k := range c.m { // an arbitrary entry
			delete(c.m, k)
			break
		}
	}
	c.m[string(ekDER)] = ne
	c.mu.Unlock()
	return cert, nil
}

// Len returns the number of certificates remembered.
func (c *EKCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
