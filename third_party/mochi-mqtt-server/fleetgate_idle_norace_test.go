//go:build !race

package mqtt

import (
	"bufio"
	"fmt"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/packets"
)

// deepHook uses 6 KiB of stack when it reads a packet, so that every read
// loop's stack grows to 8 KiB, as fleetgate's hooks and the TLS handshake
// make it grow.
type deepHook struct{ HookBase }

func (h *deepHook) ID() string           { return "deep" }
func (h *deepHook) Provides(b byte) bool { return b == OnPacketRead }
func (h *deepHook) OnPacketRead(_ *Client, pk packets.Packet) (packets.Packet, error) {
	useStack(12)
	return pk, nil
}

//go:noinline
func useStack(n int) byte {
	var b [512]byte
	b[n] = byte(n)
	if n > 0 {
		return useStack(n-1) + b[n]
	}
	return b[0]
}

// connect311 is an MQTT 3.1.1 CONNECT with a clean session, keepalive 60 s
// and the client ID id (shorter than 100 bytes).
func connect311(id string) []byte {
	body := append([]byte{0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, byte(len(id))}, id...)
	return append([]byte{packets.Connect << 4, byte(len(body))}, body...)
}

// deepConn's Read waits about as deep in the stack as crypto/tls's record
// reader does (about 1 KiB of frames above the socket's read).
type deepConn struct{ net.Conn }

func (c deepConn) Read(p []byte) (int, error) { return deepRead(c.Conn, p, 3) }

var deepSink byte

//go:noinline
func deepRead(c net.Conn, p []byte, n int) (int, error) {
	var pad [320]byte
	pad[n] = byte(len(p))
	if n > 0 {
		k, err := deepRead(c, p, n-1)
		deepSink += pad[k%len(pad)]
		return k, err
	}
	return c.Read(p)
}

// idleStackPerLoop connects n clients whose read loops grow an 8 KiB stack
// and then idle, and returns the stack bytes per loop after two
// collections. idle: the connections are IdleWaiters (deep reads, shallow
// waits); otherwise they wait deep in their Read.
func idleStackPerLoop(t *testing.T, n int, idle bool) float64 {
	s := New(&Options{Logger: logger})
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	require.NoError(t, s.AddHook(new(deepHook), nil))
	defer s.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	errs := make(chan error, n)
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
		for range clients {
			<-errs
		}
	}()
	for i := 0; i < n; i++ {
		sc, cc := tcpPair(t, ln)
		clients = append(clients, cc)
		var conn net.Conn = deepConn{sc}
		var cl *Client
		if idle {
			ic := &idleConn{Conn: deepConn{sc}, raw: sc}
			cl = s.NewClient(ic, "t", "", false)
			ic.cl = cl
		} else {
			cl = s.NewClient(conn, "t", "", false)
		}
		go func() { errs <- s.attachClient(cl, "t") }()
		require.NoError(t, cc.SetDeadline(time.Now().Add(60*time.Second)))
		_, err := cc.Write(append(connect311(fmt.Sprintf("idle-%d", i)), publishQos1(1)...))
		require.NoError(t, err)
		br := bufio.NewReader(cc)
		typ, _ := readPacketType(t, br)
		require.Equal(t, byte(packets.Connack), typ)
		typ, _ = readPacketType(t, br)
		require.Equal(t, byte(packets.Puback), typ) // read through deepHook: an 8 KiB stack
	}
	// Every loop now waits for its next packet.
	runtime.GC()
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	return (float64(after.StackInuse) - float64(before.StackInuse)) / float64(n)
}

// Patch 28: read loops waiting through IdleWaiter are shallow enough for
// the runtime to halve their 8 KiB stacks (it does when a goroutine uses
// less than a quarter of its stack, counting an 800-byte reserve); loops
// waiting inside a TLS-deep Read keep them. Not under the race detector,
// which doubles the reserve.
func TestIdleWaitStackShrinks(t *testing.T) {
	const n = 500
	shallow := idleStackPerLoop(t, n, true)
	deep := idleStackPerLoop(t, n, false)
	t.Logf("stack per idle read loop: %.0f bytes waiting in Read, %.0f through IdleWaiter", deep, shallow)
	require.Greater(t, deep, 7.0*1024, "the deep wait shrank: the test no longer tells")
	require.Less(t, shallow, 6.5*1024, "idle read loops kept their 8 KiB stacks")
}
