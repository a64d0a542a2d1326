package mqtt

// Tests of fleetgate patch 28 (FORK.md): an idle read loop waits through
// IdleWaiter, in a shallow frame and without its read buffer.

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/packets"
)

// idleConn is a connection with no buffering layer of its own that waits
// for the network by reading one byte, held for the next Read, as
// fleetgate's TLS connection does. It counts the waits, and the waits
// during which the read loop had given back its read buffer.
type idleConn struct {
	net.Conn
	raw            net.Conn // under Conn; nil: Conn itself
	cl             *Client
	one            [1]byte
	held           bool
	waits, without int
}

func (c *idleConn) Buffered() (bool, error) { return c.held, nil }

func (c *idleConn) WaitReadable() error {
	c.waits++
	if c.cl.Net.bconn == nil { // the read loop's goroutine: no race
		c.without++
	}
	raw := c.raw
	if raw == nil {
		raw = c.Conn
	}
	n, err := raw.Read(c.one[:])
	if n > 0 {
		c.held = true
		return nil
	}
	return err
}

func (c *idleConn) Read(p []byte) (int, error) {
	if c.held && len(p) > 0 {
		p[0], c.held = c.one[0], false
		return 1, nil
	}
	return c.Conn.Read(p)
}

// tcpPair is a loopback TCP connection's two ends.
func tcpPair(t *testing.T, ln net.Listener) (server, client net.Conn) {
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	return server, client
}

// readPacketType reads one whole packet (remaining length < 128) and
// returns its type and, for a PUBACK, its packet ID.
func readPacketType(t *testing.T, br *bufio.Reader) (byte, uint16) {
	h, err := br.ReadByte()
	require.NoError(t, err)
	n, err := br.ReadByte()
	require.NoError(t, err)
	b := make([]byte, n)
	_, err = io.ReadFull(br, b)
	require.NoError(t, err)
	if h>>4 == packets.Puback {
		return h >> 4, uint16(b[0])<<8 | uint16(b[1])
	}
	return h >> 4, 0
}

// Every wait for the network goes through WaitReadable with the read
// buffer given back; packets arriving one at a time, several in one write,
// or split across writes are all read whole and in order, the buffer comes
// back with its size, and the read loop ends with the connection.
func TestIdleWaitReleasesReadBuffer(t *testing.T) {
	s := New(&Options{Logger: logger, ClientNetReadBufferSize: 512})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	defer s.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	sc, cc := tcpPair(t, ln)
	defer cc.Close()
	ic := &idleConn{Conn: sc}
	cl := s.NewClient(ic, "t", "", false)
	ic.cl = cl
	errs := make(chan error, 1)
	go func() { errs <- s.attachClient(cl, "t") }()

	require.NoError(t, cc.SetDeadline(time.Now().Add(60*time.Second))) // fail, not hang
	br := bufio.NewReader(cc)
	_, err = cc.Write(packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes)
	require.NoError(t, err)
	typ, _ := readPacketType(t, br)
	require.Equal(t, byte(packets.Connack), typ)
	// One at a time: each PUBLISH arrives while the loop waits.
	for id := uint16(1); id <= 3; id++ {
		_, err = cc.Write(publishQos1(id))
		require.NoError(t, err)
		typ, got := readPacketType(t, br)
		require.Equal(t, byte(packets.Puback), typ)
		require.Equal(t, id, got)
	}
	// Three in one write, then one split in two writes.
	in := append(append(publishQos1(4), publishQos1(5)...), publishQos1(6)...)
	_, err = cc.Write(in)
	require.NoError(t, err)
	for id := uint16(4); id <= 6; id++ {
		typ, got := readPacketType(t, br)
		require.Equal(t, byte(packets.Puback), typ)
		require.Equal(t, id, got)
	}
	p7 := publishQos1(7)
	_, err = cc.Write(p7[:3])
	require.NoError(t, err)
	_, err = cc.Write(p7[3:])
	require.NoError(t, err)
	typ, got := readPacketType(t, br)
	require.Equal(t, byte(packets.Puback), typ)
	require.Equal(t, uint16(7), got)

	require.NoError(t, cc.Close())
	<-errs // the loop ended with the connection
	// The loop waited before each of the separate writes at least (the
	// CONNECT is read by attachClient itself), always without its buffer.
	require.GreaterOrEqual(t, ic.waits, 5)
	require.Equal(t, ic.waits, ic.without)
	require.NotNil(t, cl.Net.bconn)
	require.Equal(t, 512, cl.Net.bconn.Size())
}

// A connection without IdleWaiter keeps upstream's read loop: no wait
// outside Read, the buffer kept.
func TestIdleWaitOnlyForIdleWaiters(t *testing.T) {
	s := New(&Options{Logger: logger})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	defer s.Close()
	r, w := net.Pipe()
	defer r.Close()
	cl := s.NewClient(w, "t", "", false)
	br0 := cl.Net.bconn
	errs := make(chan error, 1)
	go func() { errs <- s.attachClient(cl, "t") }()
	require.NoError(t, r.SetDeadline(time.Now().Add(60*time.Second)))
	go func() {
		_, _ = r.Write(append(append([]byte{}, packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes...), publishQos1(1)...))
	}()
	br := bufio.NewReader(r)
	typ, _ := readPacketType(t, br)
	require.Equal(t, byte(packets.Connack), typ)
	typ, got := readPacketType(t, br)
	require.Equal(t, byte(packets.Puback), typ)
	require.Equal(t, uint16(1), got)
	require.NoError(t, r.Close())
	<-errs
	require.Same(t, br0, cl.Net.bconn)
}
