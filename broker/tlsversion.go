package broker

import (
	"crypto/tls"
	"fmt"
)

// TLS12CipherSuites are the only suites a TLS 1.2 client is offered when
// the broker accepts TLS 1.2 (Config.MinTLS): ECDHE key exchange (forward
// secrecy) with the ECDSA certificates fleetgate issues, and AEAD ciphers
// only; AES-GCM for devices with AES hardware (mbedTLS, ESP-IDF), ChaCha20-
// Poly1305 for those without. No CBC, no RSA key exchange, no SHA-1 MAC.
// TLS 1.3 suites are Go's (not configurable, all AEAD).
var TLS12CipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
}

// ParseMinTLS maps "1.2" or "1.3" to a TLS version ("" is 1.3).
func ParseMinTLS(s string) (uint16, error) {
	switch s {
	case "", "1.3":
		return tls.VersionTLS13, nil
	case "1.2":
		return tls.VersionTLS12, nil
	}
	return 0, fmt.Errorf("min TLS version %q (want 1.2 or 1.3)", s)
}

// serverTLS is the listeners' TLS configuration: mTLS against the client
// CAs, and the same certificate checks (VerifyConnection: the directory's
// identity, revocation, expiry and device state) on TLS 1.2 and 1.3, full
// and resumed handshakes alike.
func (b *Broker) serverTLS() *tls.Config {
	min := b.cfg.MinTLS
	if min == 0 {
		min = tls.VersionTLS13
	}
	c := &tls.Config{
		MinVersion:       min,
		Certificates:     []tls.Certificate{b.cfg.ServerCert},
		ClientAuth:       tls.RequireAndVerifyClientCert,
		ClientCAs:        b.cfg.ClientCAs,
		VerifyConnection: b.hook.VerifyConnection,
	}
	if min < tls.VersionTLS13 {
		// Curves stay Go's defaults: fixing them here would also take
		// the post-quantum hybrid (X25519MLKEM768) from TLS 1.3 clients.
		c.CipherSuites = TLS12CipherSuites
	}
	if b.cfg.ServerCertFunc != nil { // a stapled server certificate
		c.Certificates, c.GetCertificate = nil, b.cfg.ServerCertFunc
	}
	return c
}
