package broker

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// MQTT over WebSocket over mTLS (wss). A wss connection is admitted exactly
// as an MQTT one: the same listener code accepts it into the same admission
// (one pool of pending slots, the per-address and per-identity caps, the
// hello timeout), and runs the same TLS handshake with the same
// configuration (client certificate, VerifyConnection: identity,
// revocation, device state); its CONNECT goes through the same auth hook,
// its packets through the same ACL and limits, and a revocation closes it
// as any session. What differs is one step between the TLS handshake and
// MQTT: the HTTP upgrade, served by net/http (request parsing, 400/426/431
// answers) and gorilla/websocket (the handshake and the framing), bounded by
// the connection's handshake+CONNECT deadline and wsMaxHeaderBytes. mochi's
// own websocket listener (listeners.Websocket) is not used: it runs its own
// TLS and admission, none of the above.

// wsMaxHeaderBytes bounds an upgrade request's header (net/http adds its
// own 4 KiB of slack); larger: 431 and closed.
const wsMaxHeaderBytes = 4 << 10

// wsUpgrader serves the HTTP upgrade of a wss listener's connections: they
// are handed over (serve) to an http.Server through an in-memory
// net.Listener (Accept).
type wsUpgrader struct {
	l         *listener
	srv       *http.Server
	up        websocket.Upgrader
	readLimit int64 // largest WebSocket message
	conns     chan *wsHTTPConn
	done      chan struct{}
	once      sync.Once
	establish listeners.EstablishFn
}

func newWSUpgrader(l *listener, maxPacket uint32) *wsUpgrader {
	w := &wsUpgrader{l: l, conns: make(chan *wsHTTPConn), done: make(chan struct{}),
		// An MQTT packet may span messages, and a message hold packets:
		// a message is bounded as a packet is, plus room for a few small
		// ones around it.
		readLimit: int64(maxPacket) + 64<<10,
		up: websocket.Upgrader{
			HandshakeTimeout: l.timeout,
			ReadBufferSize:   1024, WriteBufferSize: 1024,
			Subprotocols: []string{"mqtt"},
			// CheckOrigin is gorilla's default: a request with an Origin
			// other than its Host is refused, so a web page cannot use a
			// browser's client certificate to reach the broker. Devices
			// send no Origin.
		}}
	w.srv = &http.Server{
		Handler:           w,
		ReadHeaderTimeout: l.timeout,
		MaxHeaderBytes:    wsMaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(l.log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, wsConnKey{}, c)
		},
	}
	// One request per connection: the upgrade, or an answer and close.
	w.srv.SetKeepAlivesEnabled(false)
	return w
}

type wsConnKey struct{}

// start serves upgrades until close.
func (w *wsUpgrader) start(establish listeners.EstablishFn) {
	w.establish = establish
	w.l.wg.Add(1)
	go func() {
		defer w.l.wg.Done()
		_ = w.srv.Serve(w)
	}()
}

// serve hands an admitted, TLS-handshaken connection to the HTTP server
// and returns when it is done with it (closed, upgraded or not).
func (w *wsUpgrader) serve(c *conn) {
	hc := &wsHTTPConn{conn: c, closed: make(chan struct{})}
	select {
	case w.conns <- hc:
		<-hc.closed
	case <-w.done:
		c.Close()
	}
}

func (w *wsUpgrader) close() {
	w.once.Do(func() {
		close(w.done)
		_ = w.srv.Close()
	})
}

// Accept, Close and Addr make wsUpgrader the http.Server's net.Listener.
func (w *wsUpgrader) Accept() (net.Conn, error) {
	select {
	case c := <-w.conns:
		return c, nil
	case <-w.done:
		return nil, net.ErrClosed
	}
}

func (w *wsUpgrader) Close() error { return nil } // w.close stops it
func (w *wsUpgrader) Addr() net.Addr {
	if w.l.ln != nil {
		return w.l.ln.Addr()
	}
	return &net.TCPAddr{}
}

// ServeHTTP upgrades the request's connection to a WebSocket and runs its
// MQTT session on it.
func (w *wsUpgrader) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	hc, ok := r.Context().Value(wsConnKey{}).(*wsHTTPConn)
	if !ok {
		http.Error(rw, "no connection", http.StatusInternalServerError)
		return
	}
	ws, err := w.up.Upgrade(rw, r, nil) // answers 400/403/426 itself
	if err != nil {
		return
	}
	defer hc.Close()
	ws.SetReadLimit(w.readLimit)
	// net/http cleared the read deadline after the header: the
	// connection has until its handshake+CONNECT deadline for CONNECT
	// (mochi sets the keepalive deadline after it).
	_ = hc.conn.SetDeadline(hc.conn.deadline)
	wc := &wsConn{conn: hc.conn, ws: ws}
	w.l.ended(hc.conn, w.establish(w.l.id, wc))
}

// wsHTTPConn is an admitted connection while net/http holds it; its Close
// tells serve that the HTTP server is done with it.
type wsHTTPConn struct {
	*conn
	closed chan struct{}
	once   sync.Once
}

func (h *wsHTTPConn) Close() error {
	err := h.conn.Close()
	h.once.Do(func() { close(h.closed) })
	return err
}

// wsConn is an MQTT connection over a WebSocket: binary messages carry the
// byte stream. It is a *conn for everything else (TLS state for the auth
// hook, the pending slot, the role, addresses and deadlines), so the
// broker treats it as any mTLS connection.
type wsConn struct {
	*conn
	ws *websocket.Conn
	r  io.Reader // the message being read
	wm sync.Mutex
}

// errWSText: MQTT over WebSocket is carried in binary messages only
// [MQTT-6.0.0-1].
var errWSText = errors.New("websocket: a non-binary message")

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errWSText
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			err = nil
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wm.Lock()
	defer c.wm.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error {
	// A close frame first, best effort and briefly: not while a write is
	// blocked on a peer that does not read (closing must not wait for it).
	if c.wm.TryLock() {
		_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(100*time.Millisecond))
		c.wm.Unlock()
	}
	return c.conn.Close()
}

// addWSS adds the wss listener, sharing the MQTT listener's admission and
// TLS configuration.
func (b *Broker) addWSS() error {
	m := b.ln
	b.wss = &listener{id: "wss", addr: b.cfg.WSSAddr, tls: m.tls, timeout: m.timeout, helloTimeout: m.helloTimeout,
		identOf: m.identOf, adm: m.adm, log: b.log.With("listener", "wss"), onRefuse: m.onRefuse}
	b.wss.ws = newWSUpgrader(b.wss, b.cfg.MaxPacketSize)
	return b.server.AddListener(b.wss)
}

// WSSAddr returns the wss listening address ("" if none).
func (b *Broker) WSSAddr() string {
	if b.wss == nil {
		return ""
	}
	return b.wss.Address()
}
