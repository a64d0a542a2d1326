package broker

import (
	"crypto/tls"
	"crypto/x509"
	"sync"
	"sync/atomic"

	"github.com/fleetgate/fleetgate/broker/auth"
)

// The trust of the mTLS listener changes while it runs: an issuing-CA
// rotation adds a client CA, a retirement removes one, and the server
// certificate is re-issued by the new CA. New handshakes use the new
// configuration at once (the listener's GetConfigForClient hands it out);
// live sessions are kept, but for those on a retired CA
// (CloseUntrustedSessions).

// dynamicTLS is the listener's configuration as changed at run time.
type dynamicTLS struct {
	mu   sync.Mutex
	pool *x509.CertPool
	cert *tls.Certificate
	cur  atomic.Pointer[tls.Config]
}

// current is the configuration of a new handshake: nil until a change
// (then the listener's own).
func (l *listener) current() *tls.Config { return l.dyn.cur.Load() }

func (l *listener) setTLS(pool *x509.CertPool, cert *tls.Certificate) {
	d := &l.dyn
	d.mu.Lock()
	defer d.mu.Unlock()
	if pool != nil {
		d.pool = pool
	}
	if cert != nil {
		d.cert = cert
	}
	c := l.tls.Clone()
	c.GetConfigForClient = nil // it is the answer of the listener's own
	if d.pool != nil {
		c.ClientCAs = d.pool
	}
	if d.cert != nil {
		c.Certificates = []tls.Certificate{*d.cert}
	}
	d.cur.Store(c)
}

// SetClientCAs replaces the CAs client certificates must chain to (the
// trusted issuing CAs) for every new handshake. Live sessions are kept.
func (b *Broker) SetClientCAs(pool *x509.CertPool) {
	b.eachListener(func(l *listener) { l.setTLS(pool, nil) })
}

// SetServerCertificate replaces the listener's certificate for every new
// handshake.
func (b *Broker) SetServerCertificate(cert tls.Certificate) {
	b.eachListener(func(l *listener) { l.setTLS(nil, &cert) })
}

// tlsListenerIDs are the IDs of the broker's TLS listeners: the mTLS one
// and, when configured, MQTT over WebSocket, which share one trust.
var tlsListenerIDs = []string{"mtls", "wss"}

func (b *Broker) eachListener(fn func(*listener)) {
	done := false
	for _, id := range tlsListenerIDs {
		if l, ok := b.server.Listeners.Get(id); ok {
			if ml, ok := l.(*listener); ok {
				fn(ml)
				done = done || ml == b.ln
			}
		}
	}
	if !done {
		fn(b.ln)
	}
}

// CloseUntrustedSessions closes every live session whose certificate the
// directory no longer vouches for by its issuer (directory.TrustedIssuer:
// its issuing CA was retired) and returns how many it closed.
func (b *Broker) CloseUntrustedSessions() int {
	n := 0
	b.hook.Sessions(func(s *auth.Session) bool {
		if !s.Online() || s.Client == nil {
			return true
		}
		cs, ok := s.Client.Net.Conn.(auth.ConnState)
		if !ok {
			return true
		}
		st := cs.ConnectionState()
		var leaf *x509.Certificate
		if len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
			leaf = st.VerifiedChains[0][0]
		} else if len(st.PeerCertificates) > 0 {
			leaf = st.PeerCertificates[0]
		}
		if leaf != nil && !b.cfg.Directory.TrustedIssuer(leaf) {
			b.closeSession(s, "issuer_retired")
			n++
		}
		return true
	})
	return n
}
