package directory

import (
	"bytes"
	"crypto/x509"
	"errors"
	"sync/atomic"
)

// ErrIssuerNotTrusted: the certificate's issuing CA is not (any more) one
// the fleet trusts (it was retired).
var ErrIssuerNotTrusted = errors.New("certificate issued by an issuing CA that is not trusted (retired)")

// issuers is the set of trusted issuing CAs; nil: not checked here (the
// TLS layer's pool decides alone).
type issuers struct {
	certs []*x509.Certificate
}

type trustedIssuers struct{ p atomic.Pointer[issuers] }

// SetTrustedIssuers replaces the issuing CAs whose certificates Verify
// accepts (the current one and those in a rotation's overlap). It matters
// because a resumed TLS session is not verified against the client-CA pool
// again: Verify, which runs on every handshake and CONNECT, refuses a
// retired CA's certificates. nil: no check (a directory that was never told).
func (d *Directory) SetTrustedIssuers(certs []*x509.Certificate) {
	if certs == nil {
		d.issuers.p.Store(nil)
		return
	}
	d.issuers.p.Store(&issuers{certs: append([]*x509.Certificate(nil), certs...)})
}

// TrustedIssuer reports whether leaf was issued by a trusted issuing CA
// (always true when no set was given).
func (d *Directory) TrustedIssuer(leaf *x509.Certificate) bool {
	s := d.issuers.p.Load()
	if s == nil {
		return true
	}
	for _, c := range s.certs {
		if len(leaf.AuthorityKeyId) > 0 && len(c.SubjectKeyId) > 0 {
			if bytes.Equal(leaf.AuthorityKeyId, c.SubjectKeyId) {
				return true
			}
			continue
		}
		if bytes.Equal(leaf.RawIssuer, c.RawSubject) && leaf.CheckSignatureFrom(c) == nil {
			return true
		}
	}
	return false
}
