package server

import (
	"crypto/x509"
	"fmt"
	"net"
	"net/url"
	"path/filepath"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
)

// openCAKey opens the issuing CA's key named by ca_key (default: the data
// directory's ca/issuing.key, which must be 0600). Every failure (wrong
// PIN, missing module, token, TPM or key, a readable key file) stops the
// start with the reference, PIN redacted, and what is wrong.
func openCAKey(cfg Config, l Layout) (keystore.Key, error) {
	ref := cfg.CAKey
	if ref == "" {
		ref = "file:" + filepath.Join(l.Dir, ca.IssuingKeyFile)
	}
	k, err := keystore.Open(ref)
	if err != nil {
		return nil, fmt.Errorf("issuing CA key (ca_key / --ca-key): %w", err)
	}
	return k, nil
}

// ocspURLs are the OCSP responder URLs for the AIA of issued certificates:
// ocsp_url, else http://<first name of the server certificate>:<port of
// the bound ocsp_addr>/ocsp when ocsp_addr is set, else none.
func ocspURLs(cfg Config, bound string, server *x509.Certificate) []string {
	if cfg.OCSPURL != "" {
		return []string{cfg.OCSPURL}
	}
	if bound == "" || server == nil {
		return nil
	}
	_, port, err := net.SplitHostPort(bound)
	if err != nil {
		return nil
	}
	host := ""
	switch {
	case len(server.DNSNames) > 0:
		host = server.DNSNames[0]
	case len(server.IPAddresses) > 0:
		host = server.IPAddresses[0].String()
	default:
		return nil
	}
	return []string{(&url.URL{Scheme: "http", Host: net.JoinHostPort(host, port), Path: "/ocsp"}).String()}
}
