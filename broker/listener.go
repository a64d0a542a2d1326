package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/fleetgate/fleetgate/broker/auth"
	"github.com/fleetgate/fleetgate/internal/identity"
)

// listener is an mTLS listener for mochi that, unlike listeners.TCP, performs
// the TLS handshake itself under a deadline that also covers the CONNECT
// packet (mochi sets none before CONNECT), and caps the number of
// connections that have not yet finished both.
type listener struct {
	id          string
	addr        string
	tls         *tls.Config
	timeout     time.Duration
	pending     chan struct{} // semaphore of unauthenticated connections
	perIP       int
	ipMu        sync.Mutex
	pendingByIP map[string]int
	log         *slog.Logger
	onRefuse    func(reason string)
	// roleOf names the role of a handshake's verified leaf certificate (the
	// broker sizes each client's outbound queue by it).
	roleOf func(*x509.Certificate) identity.Role

	ln     net.Listener
	closed atomic.Bool
	wg     sync.WaitGroup
}

// conn is a client connection; Release frees its pending slot once CONNECT
// was processed.
type conn struct {
	*tls.Conn
	release func()
	role    identity.Role // of the verified client certificate
}

// Release frees the connection's slot among unauthenticated connections.
func (c *conn) Release() { c.release() }

func (l *listener) ID() string       { return l.id }
func (l *listener) Protocol() string { return "tcp+mtls" }
func (l *listener) Address() string {
	if l.ln != nil {
		return l.ln.Addr().String()
	}
	return l.addr
}

func (l *listener) Init(*slog.Logger) error {
	ln, err := net.Listen("tcp", l.addr)
	if err != nil {
		return err
	}
	l.ln = ln
	return nil
}

func (l *listener) Serve(establish listeners.EstablishFn) {
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			l.log.Warn("accept failed", "err", err)
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: back off, keep serving
			continue
		}
		ip := hostOf(raw.RemoteAddr())
		if !l.takeIP(ip) {
			// One source address may not hold many half-open connections.
			l.onRefuse("pending_per_ip")
			raw.Close()
			continue
		}
		select {
		case l.pending <- struct{}{}:
		default:
			// Too many connections still in handshake or before CONNECT.
			l.releaseIP(ip)
			l.onRefuse("pending_limit")
			raw.Close()
			continue
		}
		var once sync.Once
		release := func() { once.Do(func() { <-l.pending; l.releaseIP(ip) }) }
		l.wg.Add(1)
		go l.handshake(raw, release, establish)
	}
}

// handshake runs the TLS handshake under the deadline. On success the
// client's MQTT session runs on a fresh goroutine: this one's stack grew
// during the handshake's cryptography, and an idle connection should not
// keep it for its lifetime. That goroutine owns the pending slot (released
// at CONNECT by the auth hook, or when the connection ends) and the wait
// group count.
func (l *listener) handshake(raw net.Conn, release func(), establish listeners.EstablishFn) {
	deadline := time.Now().Add(l.timeout)
	_ = raw.SetDeadline(deadline) // mochi replaces it with the keepalive deadline after CONNECT
	tc := tls.Server(raw, l.tls)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		defer l.wg.Done()
		defer release()
		reason := handshakeReason(err)
		ident := ""
		var re *auth.RefusedError
		if errors.As(err, &re) {
			ident = re.Identity.String()
		}
		l.log.Warn("tls handshake refused", "reason", reason, "identity", ident, "remote", raw.RemoteAddr().String(), "err", err)
		l.onRefuse(reason)
		tc.Close()
		return
	}
	c := &conn{Conn: tc, release: release}
	if st := tc.ConnectionState(); l.roleOf != nil && len(st.PeerCertificates) > 0 {
		c.role = l.roleOf(st.PeerCertificates[0])
	}
	go l.serve(c, establish)
}

// serve runs a connection's MQTT session on its own goroutine, which idles
// for the connection's lifetime: its frames are kept small (the runtime
// shrinks an idle goroutine's stack to what it uses).
func (l *listener) serve(c *conn, establish listeners.EstablishFn) {
	defer l.wg.Done()
	defer c.release()
	l.ended(c, establish(l.id, c))
}

//go:noinline
func (l *listener) ended(c *conn, err error) {
	if err != nil && !isClosedErr(err) {
		l.log.Debug("client connection ended", "remote", c.RemoteAddr().String(), "err", err)
	}
}

func hostOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	return a.String()
}

func (l *listener) takeIP(ip string) bool {
	l.ipMu.Lock()
	defer l.ipMu.Unlock()
	if l.pendingByIP[ip] >= l.perIP {
		return false
	}
	l.pendingByIP[ip]++
	return true
}

func (l *listener) releaseIP(ip string) {
	l.ipMu.Lock()
	defer l.ipMu.Unlock()
	if l.pendingByIP[ip]--; l.pendingByIP[ip] <= 0 {
		delete(l.pendingByIP, ip)
	}
}

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed)
}

// handshakeReason classifies a failed server handshake for logs and metrics.
func handshakeReason(err error) string {
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	var ne net.Error
	var re *auth.RefusedError
	switch {
	case errors.As(err, &re):
		return re.Reason
	case errors.As(err, &ua):
		return "unknown_ca"
	case errors.As(err, &inv):
		switch inv.Reason {
		case x509.Expired:
			return "expired"
		case x509.IncompatibleUsage:
			return "wrong_key_usage"
		}
		return "invalid_cert"
	case errors.As(err, &ne) && ne.Timeout():
		return "handshake_timeout"
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		// crypto/tls has no sentinel for this; the text is stable since Go 1.0.
		return "no_cert"
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return "not_tls"
	}
	return "handshake_failed"
}

func (l *listener) Close(closeClients listeners.CloseFn) {
	if l.closed.CompareAndSwap(false, true) {
		closeClients(l.id)
		if l.ln != nil {
			l.ln.Close()
		}
	}
}
