package broker

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"strings"

	"github.com/fleetgate/fleetgate/broker/auth"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// presentedCert is the leaf certificate a client presented in a refused
// handshake, from the refusal error (nil: none was presented, or the
// handshake failed before it was read). crypto/tls keeps the presented
// chain in its verification error; fleetgate's own refusal carries it too.
func presentedCert(err error) *x509.Certificate {
	var re *auth.RefusedError
	var ve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var inv x509.CertificateInvalidError
	switch {
	case errors.As(err, &re) && re.Leaf != nil:
		return re.Leaf
	case errors.As(err, &ve) && len(ve.UnverifiedCertificates) > 0:
		return ve.UnverifiedCertificates[0]
	case errors.As(err, &ua) && ua.Cert != nil:
		return ua.Cert
	case errors.As(err, &inv) && inv.Cert != nil:
		return inv.Cert
	}
	return nil
}

// certLogMax bounds each certificate field in a log line: every one of
// them is the peer's choice until the certificate is verified.
const certLogMax = 200

// certAttrs are the log attributes that name a presented certificate: its
// subject, issuer (and the issuer's key ID: which CA, when two share a
// name), serial and URI SANs (the SPIFFE identity it claims), each bounded.
// None when c is nil.
func certAttrs(c *x509.Certificate) []any {
	if c == nil {
		return nil
	}
	uris := make([]string, 0, len(c.URIs))
	for _, u := range c.URIs {
		uris = append(uris, u.String())
	}
	attrs := []any{"cert_subject", logguard.Clip(c.Subject.String(), certLogMax), "cert_issuer", logguard.Clip(c.Issuer.String(), certLogMax)}
	if len(c.AuthorityKeyId) > 0 {
		attrs = append(attrs, "cert_issuer_key_id", logguard.Clip(hex.EncodeToString(c.AuthorityKeyId), 64))
	}
	if c.SerialNumber != nil {
		attrs = append(attrs, "cert_serial", logguard.Clip(c.SerialNumber.Text(16), 64))
	}
	return append(attrs, "cert_uri", logguard.Clip(strings.Join(uris, ","), certLogMax))
}
