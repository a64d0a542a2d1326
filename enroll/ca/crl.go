package ca

import (
	"crypto/x509"
	"fmt"
	"math/big"
	"time"
)

// Revoked is one CRL entry.
type Revoked struct {
	Serial    *big.Int
	RevokedAt time.Time
	// ReasonCode is the CRL entry's reason (RFC 5280 5.3.1); 0: none.
	ReasonCode int
}

// CRL signs an RFC 5280 CRL (DER) with the issuing CA, valid for validity.
func (a *Authority) CRL(number uint64, entries []Revoked, validity time.Duration) ([]byte, error) {
	now := a.now()
	tmpl := &x509.RevocationList{
		Number:     new(big.Int).SetUint64(number),
		ThisUpdate: now,
		NextUpdate: now.Add(validity),
	}
	for _, e := range entries {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber: e.Serial, RevocationTime: e.RevokedAt.UTC(), ReasonCode: e.ReasonCode,
		})
	}
	der, err := x509.CreateRevocationList(a.rand, tmpl, a.Issuing, a.key)
	if err != nil {
		return nil, fmt.Errorf("x509.CreateRevocationList: %w", err)
	}
	return der, nil
}
