package broker

import (
	"container/list"
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
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// listener is an mTLS listener for mochi that, unlike listeners.TCP, performs
// the TLS handshake itself under a deadline that also covers the CONNECT
// packet (mochi sets none before CONNECT), and admits connections fairly
// while they have not yet finished both (see admission).
type listener struct {
	id           string
	addr         string
	tls          *tls.Config
	timeout      time.Duration // TLS handshake + CONNECT
	helloTimeout time.Duration // the first complete ClientHello
	adm          *admission
	log          *slog.Logger
	onRefuse     func(reason fleet.Reason)
	// identOf names the identity of a handshake's verified leaf
	// certificate (the broker sizes each client's outbound queue by its
	// role; admission caps a device's connections waiting for CONNECT).
	identOf func(*x509.Certificate) identity.Identity
	// refusals rate-limits the log lines of refused handshakes per source
	// address (a flood must not become a log flood).
	refusals   *logguard.Limiter
	stopLogger context.CancelFunc
	// ws, if set, makes this a WebSocket listener: after the TLS handshake
	// the connection's HTTP upgrade is served before MQTT (wss.go).
	ws *wsUpgrader

	// dyn is the TLS configuration as changed at run time (clientcas.go).
	dyn dynamicTLS

	ln     net.Listener
	closed atomic.Bool
	wg     sync.WaitGroup
}

// conn is a client connection; Release frees its pending slot once CONNECT
// was processed.
type conn struct {
	*tls.Conn
	raw      *admittedConn // under the TLS connection
	release  func()
	role     identity.Role // of the verified client certificate
	deadline time.Time     // of TLS handshake + CONNECT
	one      [1]byte       // a byte Buffered read from crypto/tls (idlewait.go)
	held     bool          // one is the next byte to read
}

// Release frees the connection's slot among unauthenticated connections.
func (c *conn) Release() { c.release() }

// Role is the role of the connection's verified client certificate.
func (c *conn) Role() identity.Role { return c.role }

// ConnectDeadline is when the connection must have completed its TLS
// handshake and CONNECT (the CONNACK written): work a hook does for the
// CONNECT fits before it.
func (c *conn) ConnectDeadline() time.Time { return c.deadline }

// admittedConn is the raw connection under the TLS server: the handshake's
// GetConfigForClient finds its admission entry through it.
type admittedConn struct {
	net.Conn
	p        *pending
	deadline time.Time // of TLS handshake + CONNECT
	// idlewait.go: a byte WaitReadable read from the socket, and the probe
	// of conn.Buffered. Used by the connection's read loop only.
	one     [1]byte
	held    bool
	probing bool
}

func (l *listener) ID() string { return l.id }
func (l *listener) Protocol() string {
	if l.ws != nil {
		return "wss+mtls"
	}
	return "tcp+mtls"
}
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
	if l.helloTimeout <= 0 {
		l.helloTimeout = l.timeout
	}
	// GetConfigForClient runs once crypto/tls has read and parsed a whole
	// ClientHello: the connection leaves the stalled stage there.
	l.tls = l.tls.Clone()
	l.tls.GetConfigForClient = l.onHello
	if l.refusals == nil {
		l.refusals = logguard.New(logguard.Options{Burst: 5, Window: time.Minute, MaxKeys: 4096, Global: logGlobal, Summaries: logGlobal,
			Summary: logguard.LogSummary(l.log, "tls handshakes refused, not logged one by one")})
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.stopLogger = cancel
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		l.refusals.Run(ctx)
	}()
	return nil
}

func (l *listener) Serve(establish listeners.EstablishFn) {
	if l.ws != nil {
		l.ws.start(establish)
	}
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
		p, evicted, reason := l.adm.admit(raw, hostOf(raw.RemoteAddr()), time.Now())
		for _, e := range evicted {
			l.onRefuse(e.reason)
			e.conn.Close()
		}
		if p == nil {
			// Every slot is held by a connection past its ClientHello.
			l.onRefuse(reason)
			raw.Close()
			continue
		}
		release := func() { l.adm.release(p) }
		l.wg.Add(1)
		go l.handshake(raw, p, release, establish)
	}
}

// onHello is the TLS server's GetConfigForClient: a complete ClientHello
// arrived, so the connection is no longer stalled. Its deadline becomes the
// one of handshake + CONNECT. An evicted connection's handshake ends here.
func (l *listener) onHello(hi *tls.ClientHelloInfo) (*tls.Config, error) {
	ac, ok := hi.Conn.(*admittedConn)
	if !ok {
		return l.current(), nil
	}
	if !l.adm.hello(ac.p) {
		return nil, errEvicted
	}
	_ = ac.Conn.SetDeadline(ac.deadline)
	return l.current(), nil
}

var errEvicted = errors.New("evicted while pending")

// handshake runs the TLS handshake under the deadlines. On success the
// client's MQTT session runs on a fresh goroutine: this one's stack grew
// during the handshake's cryptography, and an idle connection should not
// keep it for its lifetime. That goroutine owns the pending slot (released
// at CONNECT by the auth hook, or when the connection ends) and the wait
// group count.
func (l *listener) handshake(raw net.Conn, p *pending, release func(), establish listeners.EstablishFn) {
	start := time.Now()
	deadline := start.Add(l.timeout)
	// Until a complete ClientHello arrived: the short hello deadline. mochi
	// replaces the deadline with the keepalive deadline after CONNECT.
	_ = raw.SetDeadline(start.Add(l.helloTimeout))
	ac := &admittedConn{Conn: raw, p: p, deadline: deadline}
	tc := tls.Server(ac, l.tls)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	err := tc.HandshakeContext(ctx)
	cancel()
	var id identity.Identity
	if st := tc.ConnectionState(); err == nil && l.identOf != nil && len(st.PeerCertificates) > 0 {
		id = l.identOf(st.PeerCertificates[0])
	}
	if err == nil {
		ok, evicted := l.adm.handshaken(p, id)
		for _, e := range evicted {
			l.onRefuse(e.reason)
			e.conn.Close()
			if l.refusals.Allow("identity " + e.ident) {
				l.log.Warn("connection waiting for CONNECT closed: the identity opened more", "reason", e.reason,
					"identity", e.ident, "limit", l.adm.perIdentity, "remote", e.conn.RemoteAddr().String())
			}
		}
		if !ok {
			err = errEvicted
		}
	}
	if err != nil {
		defer l.wg.Done()
		defer release()
		tc.Close()
		stage, evicted := l.adm.outcome(p)
		if evicted {
			return // counted at eviction
		}
		reason := handshakeReason(err)
		if reason == fleet.ReasonHandshakeTimeout && stage == stageHello {
			reason = fleet.ReasonHelloTimeout
		}
		l.onRefuse(reason)
		ip := p.ip
		if !l.refusals.Allow(ip) {
			return
		}
		// Which device, and which CA: the presented certificate's names
		// (a refused handshake has no identity of its own to log).
		attrs := []any{"reason", reason}
		var re *auth.RefusedError
		if errors.As(err, &re) && re.Identity.Name != "" {
			attrs = append(attrs, "identity", re.Identity.String())
		}
		attrs = append(attrs, certAttrs(presentedCert(err))...)
		attrs = append(attrs, "remote", raw.RemoteAddr().String(), "err", logguard.Clip(err.Error(), 0))
		l.log.Warn("tls handshake refused", attrs...)
		return
	}
	c := &conn{Conn: tc, raw: ac, release: release, role: id.Role, deadline: deadline}
	go l.serve(c, establish)
}

// serve runs a connection's MQTT session on its own goroutine, which idles
// for the connection's lifetime: its frames are kept small (the runtime
// shrinks an idle goroutine's stack to what it uses).
func (l *listener) serve(c *conn, establish listeners.EstablishFn) {
	defer l.wg.Done()
	defer c.release()
	if l.ws != nil {
		l.ws.serve(c)
		return
	}
	l.ended(c, establish(l.id, c))
}

//go:noinline
func (l *listener) ended(c *conn, err error) {
	if err != nil && !isClosedErr(err) {
		l.log.Debug("client connection ended", "remote", c.RemoteAddr().String(), "err", err)
	}
}

// hostOf is the source key of a connection for every per-source structure
// (admission, the per-address cap, refusal log limits): its IPv4 address, or
// its IPv6 /64 (one host, or one customer, usually holds a whole /64, and
// could otherwise open each connection from another address).
func hostOf(a net.Addr) string {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return a.String()
	}
	if v4 := ta.IP.To4(); v4 != nil {
		return v4.String()
	}
	if len(ta.IP) == net.IPv6len {
		return ta.IP.Mask(net.CIDRMask(ipv6PrefixBits, 128)).String() + "/64"
	}
	return ta.IP.String()
}

// ipv6PrefixBits is the prefix by which IPv6 sources are grouped.
const ipv6PrefixBits = 64

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed)
}

// handshakeReason classifies a failed server handshake for logs and metrics.
func handshakeReason(err error) fleet.Reason {
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	var ne net.Error
	var re *auth.RefusedError
	switch {
	case errors.As(err, &re):
		return re.Reason
	case errors.As(err, &ua):
		return fleet.ReasonUnknownCA
	case errors.As(err, &inv):
		switch inv.Reason {
		case x509.Expired:
			return fleet.ReasonExpired
		case x509.IncompatibleUsage:
			return fleet.ReasonWrongKeyUsage
		}
		return fleet.ReasonInvalidCert
	case errors.As(err, &ne) && ne.Timeout():
		return fleet.ReasonHandshakeTimeout
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		// crypto/tls has no sentinel for this; the text is stable since Go 1.0.
		return fleet.ReasonNoCert
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return fleet.ReasonNotTLS
	}
	return fleet.ReasonHandshakeFailed
}

func (l *listener) Close(closeClients listeners.CloseFn) {
	if l.closed.CompareAndSwap(false, true) {
		if l.stopLogger != nil {
			l.stopLogger()
		}
		closeClients(l.id)
		if l.ln != nil {
			l.ln.Close()
		}
		if l.ws != nil {
			l.ws.close()
		}
	}
}

// Stages of a pending connection (accepted, CONNECT not yet processed).
const (
	stageHello     = iota // no complete ClientHello yet: "stalled"
	stageHandshake        // ClientHello read, TLS handshake under way
	stageConnect          // TLS done, waiting for the MQTT CONNECT (capped per device identity)
	stageDone             // released or evicted
)

// pending is one connection in admission.
type pending struct {
	conn    net.Conn
	ip      string
	ident   string // a device's identity, once its TLS handshake is done
	stage   int
	evicted bool
	reason  fleet.Reason  // why it was evicted (a limit_hits label)
	since   time.Time     // accepted
	at      *list.Element // in admission.stalled, while stalled
	atIP    *list.Element // in its address's (or identity's) list of its stage
}

// defaultPendingPerIdentity caps the connections of one device identity
// that finished their TLS handshake and wait for CONNECT: a device needs
// one (a few while it reconnects over a flaky link).
const defaultPendingPerIdentity = 4

// ipQueue is the list of one address's (or identity's) connections in one
// stage, oldest first.
type ipQueue struct {
	list.List
}

// record is an address's eviction record: one up for each of its stalled
// connections evicted, one down for each that sent its ClientHello; kept
// (while positive) for recordTTL after its last change, so that a flood
// holding one connection per address is known by its addresses as they
// come back. At most max(recordsMinimum, recordsPerSlot*max) are kept;
// past that an arbitrary one is forgotten.
type record struct {
	score int
	at    time.Time
}

const (
	recordTTL      = time.Minute
	recordsPerSlot = 4
	recordsMinimum = 1024
)

// admission decides which connections may hold the max slots of pending
// connections. The scarce resource is a slot, and a peer that does no
// cryptography can hold one only until its ClientHello is due, so:
//
//   - a connection is stalled until crypto/tls has read a complete
//     ClientHello, and stalled connections go first: when every slot is
//     taken, a new connection evicts the oldest stalled one, or, if even
//     that one is younger than grace (a flood churning fast, while a
//     device's ClientHello may wait for the CPU), the oldest stalled one
//     of the address with the highest eviction record (record), ties
//     broken by age (see stalledVictimLocked: how many stalled
//     connections an address holds does not count, or a flood opening
//     one per address would make a NAT'd fleet the victim). When none is
//     stalled, it evicts the oldest connection still in its TLS handshake
//     of the address that has the most connections in their handshake (a
//     flood replaying ClientHellos costs the broker its half of each
//     handshake, but cannot push out the handshake of a device on another
//     address). It is refused only when every slot is held by a
//     connection that finished its TLS handshake and waits for CONNECT,
//     of which one device identity holds at most perIdentity (handshaken);
//   - the per-address cap (perIP) counts stalled connections only: at it,
//     a new connection from that address evicts the address's oldest
//     stalled one if that has waited for its ClientHello longer than grace
//     (else the new one is admitted: the global cap bounds it).
//     Connections past their ClientHello are not capped per address, and a
//     burst of fresh ones is not evicted, so a fleet behind one NAT
//     address that reconnects at once is admitted.
//
// An address is an IPv4 address or an IPv6 /64 (hostOf).
//
// A device's ClientHello follows its TCP handshake within a round trip, so
// it is the newest stalled connection for the short time it is stalled; a
// flood's connections are the oldest, and are evicted first.
type admission struct {
	mu            sync.Mutex
	max           int
	perIP         int
	grace         time.Duration
	n             int       // pending connections, every stage
	stalled       list.List // no ClientHello yet, oldest first
	stalledByIP   map[string]*ipQueue
	handshakeByIP map[string]*ipQueue // in TLS handshake, oldest first
	perIdentity   int
	connectByID   map[string]*ipQueue // devices' connections waiting for CONNECT, oldest first
	records       map[string]record   // eviction records by address
	clock         time.Time           // of the latest admission: the records' clock
}

func newAdmission(max, perIP int, grace time.Duration) *admission {
	return &admission{max: max, perIP: perIP, grace: grace,
		stalledByIP: map[string]*ipQueue{}, handshakeByIP: map[string]*ipQueue{},
		perIdentity: defaultPendingPerIdentity, connectByID: map[string]*ipQueue{}, records: map[string]record{}}
}

// admit admits c from ip, evicting as described; the caller closes the
// evicted connections. A nil pending means c is refused, for reason.
func (a *admission) admit(c net.Conn, ip string, now time.Time) (p *pending, evicted []*pending, reason fleet.Reason) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.clock = now
	if q := a.stalledByIP[ip]; q != nil && q.Len() >= a.perIP {
		if old := q.Front().Value.(*pending); now.Sub(old.since) >= a.grace {
			evicted = append(evicted, a.evictLocked(old, fleet.ReasonPendingPerIP))
		}
	}
	if a.n >= a.max {
		if f := a.stalled.Front(); f != nil {
			v := f.Value.(*pending)
			if now.Sub(v.since) < a.grace {
				// Fast churn: even the oldest stalled connection is young,
				// and may be a device whose ClientHello is only waiting
				// for the CPU. Take it from the address whose stalled
				// connections keep being evicted without progress.
				v = a.stalledVictimLocked(now)
			}
			evicted = append(evicted, a.evictLocked(v, fleet.ReasonPendingEvicted))
		} else if v := busiest(a.handshakeByIP); v != nil {
			evicted = append(evicted, a.evictLocked(v, fleet.ReasonPendingEvicted))
		} else {
			return nil, evicted, fleet.ReasonPendingLimit
		}
	}
	p = &pending{conn: c, ip: ip, since: now}
	p.at = a.stalled.PushBack(p)
	p.atIP = pushIP(a.stalledByIP, ip, p)
	a.n++
	return p, evicted, ""
}

// stalledVictimLocked picks the stalled connection to evict under fast
// churn: the oldest one of the address with the highest eviction record
// (its stalled connections were evicted, not progressing: a flood that
// keeps its slots by reconnecting), ties (every address new, or
// progressing) broken by age, oldest first. The number of stalled connections an address holds does
// not count: a fleet behind one NAT address reconnecting together holds
// many, young ones that progress, while a flood can hold one per address
// from as many addresses as it likes; oldest first, each connection keeps
// its slot for as long as any other, and a device's ClientHello follows its
// TCP handshake within a round trip. A flood from few addresses still
// loses first: each of its evictions raises its address's record.
func (a *admission) stalledVictimLocked(now time.Time) *pending {
	var victim *pending
	best := 0
	for ip, q := range a.stalledByIP {
		old := q.Front().Value.(*pending)
		score := a.scoreLocked(ip, now)
		if victim == nil || score > best || (score == best && old.since.Before(victim.since)) {
			victim, best = old, score
		}
	}
	return victim
}

// scoreLocked is ip's eviction record (0: none, or expired).
func (a *admission) scoreLocked(ip string, now time.Time) int {
	r, ok := a.records[ip]
	if !ok || now.Sub(r.at) >= recordTTL {
		return 0
	}
	return r.score
}

// recordLocked adds d to ip's eviction record (not below zero).
func (a *admission) recordLocked(ip string, d int, now time.Time) {
	score := a.scoreLocked(ip, now) + d
	if score <= 0 {
		delete(a.records, ip)
		return
	}
	if _, ok := a.records[ip]; !ok && len(a.records) >= max(recordsMinimum, recordsPerSlot*a.max) {
		for k, r := range a.records {
			if now.Sub(r.at) >= recordTTL {
				delete(a.records, k)
			}
		}
		for k := range a.records { // still full: forget one, at random
			if len(a.records) < max(recordsMinimum, recordsPerSlot*a.max) {
				break
			}
			delete(a.records, k)
		}
	}
	a.records[ip] = record{score: score, at: now}
}

// busiest returns the oldest connection of the address with the most
// connections in m (ties: the oldest of those addresses'; nil: m is empty).
// The scan is over addresses with a pending connection, at most max.
func busiest(m map[string]*ipQueue) *pending {
	var victim *pending
	most := 0
	for _, q := range m {
		old := q.Front().Value.(*pending)
		if q.Len() > most || (q.Len() == most && old.since.Before(victim.since)) {
			victim, most = old, q.Len()
		}
	}
	return victim
}

func pushIP(m map[string]*ipQueue, ip string, p *pending) *list.Element {
	q := m[ip]
	if q == nil {
		q = new(ipQueue)
		m[ip] = q
	}
	return q.PushBack(p)
}

func removeIP(m map[string]*ipQueue, ip string, e *list.Element) {
	if q := m[ip]; q != nil {
		q.Remove(e)
		if q.Len() == 0 {
			delete(m, ip)
		}
	}
}

// hello moves p out of the stalled stage; false if it was evicted.
func (a *admission) hello(p *pending) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p.stage != stageHello {
		return false
	}
	a.recordLocked(p.ip, -1, a.clock)
	a.unlinkLocked(p)
	p.stage = stageHandshake
	p.atIP = pushIP(a.handshakeByIP, p.ip, p)
	return true
}

// handshaken records p's completed TLS handshake by id; false if it was
// evicted. A device identity holding more than perIdentity connections
// waiting for CONNECT loses its oldest one (evicted: the caller closes it):
// one credential, a compromised device's say, cannot hold every slot with
// connections that never send CONNECT, and a device that reconnects is
// not refused for its own stale connections.
func (a *admission) handshaken(p *pending, id identity.Identity) (ok bool, evicted []*pending) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p.stage == stageDone {
		return false, nil
	}
	a.unlinkLocked(p)
	p.stage = stageConnect
	if id.Role == identity.RoleDevice && id.Name != "" {
		p.ident = id.String()
		p.atIP = pushIP(a.connectByID, p.ident, p)
		if q := a.connectByID[p.ident]; q.Len() > a.perIdentity {
			evicted = append(evicted, a.evictLocked(q.Front().Value.(*pending), fleet.ReasonPendingPerIdentity))
		}
	}
	return true, evicted
}

// outcome reports p's stage and whether it was evicted.
func (a *admission) outcome(p *pending) (stage int, evicted bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return p.stage, p.evicted
}

// release frees p's slot (idempotent).
func (a *admission) release(p *pending) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p.stage != stageDone {
		a.unlinkLocked(p)
		p.stage = stageDone
		a.n--
	}
}

func (a *admission) evictLocked(p *pending, reason fleet.Reason) *pending {
	if p.stage == stageHello {
		a.recordLocked(p.ip, +1, a.clock)
	}
	a.unlinkLocked(p)
	p.stage = stageDone
	p.evicted, p.reason = true, reason
	a.n--
	return p
}

// unlinkLocked takes p off the lists of its stage.
func (a *admission) unlinkLocked(p *pending) {
	switch p.stage {
	case stageHello:
		a.stalled.Remove(p.at)
		removeIP(a.stalledByIP, p.ip, p.atIP)
	case stageHandshake:
		removeIP(a.handshakeByIP, p.ip, p.atIP)
	case stageConnect:
		if p.ident != "" {
			removeIP(a.connectByID, p.ident, p.atIP)
		}
	}
	p.at, p.atIP = nil, nil
}
