package broker_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// srcIP returns loopback source address 127.0.a.b for i (i >= 0), skipping
// 127.0.0.1 (the gateway's own address).
func srcIP(base byte, i int) net.IP { return net.IPv4(127, base, byte(i/250), byte(2+i%250)) }

// flood is an attacker that does no cryptography: each of its workers
// connects from one of a set of source addresses, sends the first bytes of
// a TLS record (a ClientHello that never completes) and, when the broker
// closes the connection, reconnects at once.
type flood struct {
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	live    map[net.Conn]struct{}
	dials   atomic.Int64 // connections the broker accepted
	payload []byte       // what each connection sends
}

// startFlood runs workers spread over addrs source addresses against addr
// until stop, each making at most maxDials connections and sending payload
// on each (nil: the start of a ClientHello that never completes).
func startFlood(t *testing.T, addr string, addrs []net.IP, workers, maxDials int, payload []byte) *flood {
	ctx, cancel := context.WithCancel(context.Background())
	if payload == nil {
		// A TLS handshake record header announcing 512 bytes, and the
		// first bytes of a ClientHello.
		payload = []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01}
	}
	f := &flood{cancel: cancel, live: map[net.Conn]struct{}{}, payload: payload}
	for w := 0; w < workers; w++ {
		src := addrs[w%len(addrs)]
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 2 * time.Second}
			for i := 0; i < maxDials && ctx.Err() == nil; i++ {
				c, err := d.DialContext(ctx, "tcp", addr)
				if err != nil {
					continue
				}
				f.mu.Lock()
				if ctx.Err() != nil {
					f.mu.Unlock()
					c.Close()
					return
				}
				f.live[c] = struct{}{}
				f.mu.Unlock()
				_, _ = c.Write(f.payload)
				f.dials.Add(1)
				_, _ = io.Copy(io.Discard, c) // until the broker closes it
				f.mu.Lock()
				delete(f.live, c)
				f.mu.Unlock()
				c.Close()
			}
		}()
	}
	t.Cleanup(f.stop)
	return f
}

func (f *flood) stop() {
	f.cancel()
	f.mu.Lock()
	for c := range f.live {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// connectFrom connects as a device from source address src: real TLS with
// the device certificate, MQTT 5 CONNECT, CONNACK success. The connection is
// closed again.
func connectFrom(g *testenv.Gateway, src net.IP, clientID string, cert tls.Certificate, timeout time.Duration) error {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: timeout}
	c, err := tls.DialWithDialer(d, "tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return err
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		return err
	}
	m := &mqtt5Conn{c: c, r: bufio.NewReader(c)}
	ack, err := m.read(timeout)
	if err != nil {
		return err
	}
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		return fmt.Errorf("CONNACK type %d reason 0x%02x", ack.FixedHeader.Type, ack.ReasonCode)
	}
	return nil
}

// A flood of stalled handshakes from 40 source addresses, each under the
// per-address cap and reconnecting as soon as it is closed, keeps the pending
// slots full. Real devices must keep connecting.
func TestHandshakeFloodFromManyAddressesDoesNotLockDevicesOut(t *testing.T) {
	const maxPending, workers, attempts = 256, 600, 30
	g := testenv.Start(t, testenv.Options{MaxPending: maxPending, MaxPendingPerIP: 64})
	var devs []tls.Certificate
	for i := 0; i < 3; i++ {
		devs = append(devs, certOf(t, g.EnrollDevice(t, fmt.Sprintf("fl-%d", i), "lab")))
	}
	var addrs []net.IP
	for i := 0; i < 40; i++ {
		addrs = append(addrs, srcIP(10, i))
	}
	f := startFlood(t, g.Addrs.MQTT, addrs, workers, 20000, nil)
	// The flood holds every slot before the devices try.
	testenv.Eventually(t, 30*time.Second, func() error {
		if n := f.dials.Load(); n < 2*maxPending {
			return fmt.Errorf("flood made %d connections", n)
		}
		return nil
	})
	ok := 0
	var last error
	for i := 0; i < attempts; i++ {
		err := connectFrom(g, srcIP(20, i), fmt.Sprintf("fl-%d", i%len(devs)), devs[i%len(devs)], 5*time.Second)
		if err == nil {
			ok++
		} else {
			last = err
		}
	}
	dials := f.dials.Load()
	f.stop()
	t.Logf("device connects during the flood: %d of %d succeeded (flood: %d connections; last error: %v)", ok, attempts, dials, last)
	if ok < attempts {
		t.Fatalf("only %d of %d device connects got through the flood; last error: %v", ok, attempts, last)
	}
	// The flood is counted, not logged line by line: at most a burst of 5
	// refusal lines per source address and minute.
	if n := strings.Count(g.Logs.String(), "tls handshake refused\""); n > 5*(len(addrs)+attempts) {
		t.Errorf("%d refused-handshake log lines for a flood from %d addresses", n, len(addrs))
	}
	if !strings.Contains(g.Metrics(t), `fleetgate_broker_limit_hits_total{limit="pending_evicted"}`) {
		t.Error("evictions of stalled handshakes not counted")
	}
}

// enrollFleet enrolls n devices and returns their client IDs and
// certificates.
func enrollFleet(t *testing.T, g *testenv.Gateway, prefix string, n int) ([]string, []tls.Certificate) {
	t.Helper()
	ids := make([]string, n)
	certs := make([]tls.Certificate, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s-%d", prefix, i)
		certs[i] = certOf(t, g.EnrollDevice(t, ids[i], "lab"))
	}
	return ids, certs
}

// A fleet of 100 devices behind one NAT address reconnects together (after
// the gateway or the uplink restarted, say): every device is admitted at its
// first attempt.
func TestNATFleetReconnectingTogetherIsAdmitted(t *testing.T) {
	const fleet = 100
	g := testenv.Start(t, testenv.Options{})
	ids, certs := enrollFleet(t, g, "nat", fleet)
	nat := srcIP(30, 0)
	for round := 0; round < 2; round++ {
		start := make(chan struct{})
		errs := make([]error, fleet)
		var wg sync.WaitGroup
		for i := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = connectFrom(g, nat, ids[i], certs[i], 20*time.Second)
			}()
		}
		close(start)
		wg.Wait()
		failed := 0
		var last error
		for _, err := range errs {
			if err != nil {
				failed++
				last = err
			}
		}
		t.Logf("round %d: %d of %d devices behind one address refused", round, failed, fleet)
		if failed > 0 {
			t.Fatalf("round %d: %d of %d devices behind one address were refused; last error: %v", round, failed, fleet, last)
		}
	}
}

// An attacker on the same address as a NAT'd fleet floods it with stalled
// handshakes (more than the per-address cap) and reconnects as soon as it
// is closed: the fleet's devices still get through.
func TestAttackerOnTheFleetsAddressDoesNotLockItOut(t *testing.T) {
	const attempts = 30
	g := testenv.Start(t, testenv.Options{MaxPendingPerIP: 64})
	ids, certs := enrollFleet(t, g, "shared", 3)
	nat := srcIP(31, 0)
	f := startFlood(t, g.Addrs.MQTT, []net.IP{nat}, 100, 20000, nil)
	// The attacker holds the address's cap of stalled connections, old
	// enough to be evicted for newcomers, before the devices try.
	testenv.Eventually(t, 30*time.Second, func() error {
		if !strings.Contains(g.Metrics(t), `fleetgate_broker_limit_hits_total{limit="pending_per_ip"}`) {
			return fmt.Errorf("flood made %d connections, none evicted yet", f.dials.Load())
		}
		return nil
	})
	ok := 0
	var last error
	for i := 0; i < attempts; i++ {
		if err := connectFrom(g, nat, ids[i%len(ids)], certs[i%len(ids)], 5*time.Second); err == nil {
			ok++
		} else {
			last = err
		}
	}
	dials := f.dials.Load()
	f.stop()
	t.Logf("device connects from the attacker's address: %d of %d succeeded (flood: %d connections; last error: %v)", ok, attempts, dials, last)
	if ok < attempts {
		t.Fatalf("only %d of %d device connects from the attacker's address got through; last error: %v", ok, attempts, last)
	}
}

// A flood that holds one stalled connection per source address, from many
// addresses, reconnecting as soon as it is closed, keeps every slot full
// while a fleet behind one NAT address reconnects together, round after
// round: the fleet's address holds the most stalled connections for a
// moment, and must not be where the slots are taken from.
func TestManyAddressFloodDoesNotEvictANATFleet(t *testing.T) {
	const maxPending, floodAddrs, fleet, rounds = 16, 48, 8, 4
	g := testenv.Start(t, testenv.Options{MaxPending: maxPending, MaxPendingPerIP: 64})
	ids, certs := enrollFleet(t, g, "natflood", fleet)
	var addrs []net.IP
	for i := 0; i < floodAddrs; i++ {
		addrs = append(addrs, srcIP(50, i))
	}
	f := startFlood(t, g.Addrs.MQTT, addrs, floodAddrs, 20000, nil) // one worker, one connection at a time, per address
	testenv.Eventually(t, 30*time.Second, func() error {
		if n := f.dials.Load(); n < 4*maxPending {
			return fmt.Errorf("flood made %d connections", n)
		}
		return nil
	})
	nat := srcIP(51, 0)
	failed := 0
	var last error
	for round := 0; round < rounds; round++ {
		start := make(chan struct{})
		errs := make([]error, fleet)
		var wg sync.WaitGroup
		for i := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = connectFrom(g, nat, ids[i], certs[i], 10*time.Second)
			}()
		}
		close(start)
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				failed++
				last = err
			}
		}
	}
	dials := f.dials.Load()
	f.stop()
	t.Logf("NAT'd fleet during a %d-address flood: %d of %d connects failed (flood: %d connections; last error: %v)", floodAddrs, failed, fleet*rounds, dials, last)
	if failed > 0 {
		t.Fatalf("%d of %d connects of the NAT'd fleet failed during the flood; last error: %v", failed, fleet*rounds, last)
	}
}
