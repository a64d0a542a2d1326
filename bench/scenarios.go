package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
)

// Values are one repetition's measurements, by metric name.
type Values map[string]float64

func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// ---- 1, 2: handshake + CONNECT/CONNACK ----

// Connects runs `workers` clients, each connecting (full mTLS handshake, or
// TLS 1.3 resumption with resume), CONNECT, CONNACK, DISCONNECT, in a loop
// for d. Worker w is device w: one live session per identity.
func (e *Env) Connects(ctx context.Context, b *Broker, workers int, d time.Duration, resume bool) (Values, error) {
	if workers > len(e.Devices) {
		return nil, fmt.Errorf("%d workers, %d devices", workers, len(e.Devices))
	}
	dialer := &Dialer{Addr: b.MQTT, ServerName: "localhost"}
	cfgs := make([]*tls.Config, workers)
	for w := range cfgs {
		var cache tls.ClientSessionCache
		if resume {
			cache = tls.NewLRUClientSessionCache(1)
		}
		cfgs[w] = e.ClientTLS(e.Devices[w], cache)
	}
	if resume { // a first full handshake fills each worker's session cache
		if err := parallel(ctx, workers, 32, func(w int) error {
			c, err := dialer.Connect(ctx, cfgs[w], e.Devices[w].Name, 60, 256)
			if err != nil {
				return err
			}
			c.Disconnect()
			return nil
		}); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
	}
	lats := make([][]time.Duration, workers)
	var resumed, fails atomic.Int64
	var firstErr atomic.Value
	meter, err := startCPU(b.PID)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := make([]time.Duration, 0, 1024)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				c, err := dialer.Connect(ctx, cfgs[w], e.Devices[w].Name, 60, 256)
				if err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				l = append(l, time.Since(t0))
				if c.Resumed {
					resumed.Add(1)
				}
				c.Disconnect()
			}
			lats[w] = l
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	all := slices.Concat(lats...)
	slices.Sort(all)
	n := len(all)
	if n == 0 {
		return nil, fmt.Errorf("no connection succeeded: %v", firstErr.Load())
	}
	if f := fails.Load(); f > int64(n/100) {
		return nil, fmt.Errorf("%d of %d connects failed, first: %v", f, int64(n)+f, firstErr.Load())
	}
	v := Values{
		"connects/s":          float64(n) / wall.Seconds(),
		"p50 ms":              ms(pct(all, 0.50)),
		"p99 ms":              ms(pct(all, 0.99)),
		"broker CPU µs/conn":  us(cpu) / float64(n),
		"failed":              float64(fails.Load()),
		"resumed %":           100 * float64(resumed.Load()) / float64(n),
		"broker CPU % (of 1)": 100 * cpu.Seconds() / wall.Seconds(),
	}
	if !resume {
		delete(v, "resumed %")
	}
	return v, nil
}

// parallel runs f(0..n-1) with at most k at once; first error wins.
func parallel(ctx context.Context, n, k int, f func(i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range min(k, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return first
}

// ---- 3, 4: fan-in ----

const payloadSize = 64

// bitset records sequence numbers.
type bitset []uint64

func (b *bitset) set(i uint32) bool {
	w := int(i / 64)
	if w >= len(*b) {
		*b = append(*b, make([]uint64, w-len(*b)+1+len(*b)/2)...)
	}
	m := uint64(1) << (i % 64)
	was := (*b)[w]&m != 0
	(*b)[w] |= m
	return was
}

func (b bitset) has(i uint32) bool {
	w := int(i / 64)
	return w < len(b) && b[w]&(1<<(i%64)) != 0
}

// FanIn connects one backend subscriber on devices/+/telemetry/# and pubs
// devices publishing 64-byte telemetry as fast as the broker takes it for
// d. QoS 0: batches of 32 PUBLISH per TLS write, paced by PINGREQ. QoS 1:
// each publisher keeps up to window PUBLISH unacknowledged; the subscriber
// acknowledges every delivery. A message counts as lost when its publisher
// got a PUBACK (QoS 1) or wrote it (QoS 0) and the subscriber never
// received it.
func (e *Env) FanIn(ctx context.Context, b *Broker, pubs int, qos byte, d time.Duration, window int) (Values, error) {
	dialer := &Dialer{Addr: b.MQTT, ServerName: "localhost"}
	sub, err := dialer.Connect(ctx, e.ClientTLS(e.Backend, nil), e.Backend.Name, 300, 256<<10)
	if err != nil {
		return nil, fmt.Errorf("subscriber: %w", err)
	}
	defer sub.TLS.Close()
	if err := sub.Subscribe("devices/+/telemetry/#", qos); err != nil {
		return nil, err
	}
	conns := make([]*Conn, pubs)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.TLS.Close()
			}
		}
	}()
	if err := parallel(ctx, pubs, 32, func(i int) error {
		c, err := dialer.Connect(ctx, e.ClientTLS(e.Devices[i], nil), e.Devices[i].Name, 300, 4096)
		conns[i] = c
		return err
	}); err != nil {
		return nil, fmt.Errorf("publishers: %w", err)
	}

	// subscriber
	received := make([]bitset, pubs)
	var recv, dups, bad atomic.Int64
	var lastRecv atomic.Int64
	subDone := make(chan error, 1)
	go func() {
		var buf []byte
		out := make([]byte, 0, 64<<10)
		for {
			h, body, err := readPacket(sub.R, buf)
			buf = body
			if err != nil {
				subDone <- err
				return
			}
			if h>>4 != pktPublish {
				continue
			}
			_, id, payload, err := publishFields(h, body)
			if err != nil || len(payload) < 8 {
				bad.Add(1)
				continue
			}
			p, seq := binary.BigEndian.Uint32(payload), binary.BigEndian.Uint32(payload[4:])
			if int(p) >= pubs {
				bad.Add(1)
				continue
			}
			if received[p].set(seq) {
				dups.Add(1)
			} else {
				recv.Add(1)
			}
			lastRecv.Store(time.Now().UnixNano())
			if (h>>1)&3 > 0 {
				out = appendPuback(out, id)
			}
			if len(out) > 0 && (sub.R.Buffered() == 0 || len(out) > 60<<10) {
				if _, err := sub.TLS.Write(out); err != nil {
					subDone <- err
					return
				}
				out = out[:0]
			}
		}
	}()

	topics := make([]string, pubs)
	for i := range topics {
		topics[i] = "devices/" + e.Devices[i].Name + "/telemetry"
	}
	acked := make([]bitset, pubs)
	sent := make([]int64, pubs)
	var pubErrs atomic.Int64
	var firstErr atomic.Value

	meter, err := startCPU(b.PID)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for i := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if qos == 0 {
				sent[i], err = publishQoS0(ctx, conns[i], uint32(i), topics[i], deadline)
			} else {
				sent[i], err = publishQoS1(ctx, conns[i], uint32(i), topics[i], deadline, window, &acked[i])
			}
			if err != nil {
				pubErrs.Add(1)
				firstErr.CompareAndSwap(nil, err)
			}
		}()
	}
	wg.Wait()
	pubEnd := time.Now()
	// drain: until everything sent (QoS 0) or acknowledged (QoS 1) has
	// arrived, or nothing arrived for 3 s; at most 30 s
	var want int64
	for i := range pubs {
		want += sent[i]
	}
	for i := 0; i < 300 && ctx.Err() == nil && recv.Load() < want; i++ {
		time.Sleep(100 * time.Millisecond)
		if time.Since(time.Unix(0, lastRecv.Load())) > 3*time.Second {
			break
		}
	}
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	sub.TLS.Close()
	<-subDone

	var total int64
	var lost int64
	for i := range pubs {
		total += sent[i]
		if qos > 0 {
			for w, word := range acked[i] {
				for bit := range 64 {
					if word&(1<<bit) != 0 && !received[i].has(uint32(w*64+bit)) {
						lost++
					}
				}
			}
		}
	}
	got := recv.Load()
	if qos == 0 {
		lost = max(0, total-got)
	}
	last := time.Unix(0, lastRecv.Load())
	if last.Before(pubEnd) {
		last = pubEnd
	}
	if got == 0 {
		return nil, fmt.Errorf("subscriber received nothing (publisher errors: %d, first %v)", pubErrs.Load(), firstErr.Load())
	}
	v := Values{
		"delivered msgs/s":    float64(got) / last.Sub(start).Seconds(),
		"lost":                float64(lost),
		"lost %":              100 * float64(lost) / float64(max(total, 1)),
		"broker CPU µs/msg":   us(cpu) / float64(got),
		"publisher errors":    float64(pubErrs.Load()),
		"broker CPU % (of 1)": 100 * cpu.Seconds() / last.Sub(start).Seconds(),
	}
	if qos > 0 {
		v["acked by broker"] = float64(total)
		v["acked msgs/s"] = float64(total) / pubEnd.Sub(start).Seconds()
		v["duplicates"] = float64(dups.Load())
	} else {
		v["sent"] = float64(total)
	}
	if pubErrs.Load() > 0 {
		e.Logf("    %s: %d publishers failed, first: %v", b.Name, pubErrs.Load(), firstErr.Load())
	}
	return v, nil
}

func telemetry(buf []byte, pub, seq uint32) []byte {
	buf = buf[:payloadSize]
	binary.BigEndian.PutUint32(buf, pub)
	binary.BigEndian.PutUint32(buf[4:], seq)
	return buf
}

// publishQoS0 writes batches of 32 QoS 0 PUBLISH, each followed by a
// PINGREQ, with at most 4 batches not yet answered by a PINGRESP: a broker
// handles a connection's packets in order, so a PINGRESP says it has read
// the batch before it. That bounds what sits unread in socket buffers, so
// "sent" is what the broker took and loss is what it dropped.
func publishQoS0(ctx context.Context, c *Conn, pub uint32, topic string, deadline time.Time) (int64, error) {
	const batch, window = 32, 4
	tokens := make(chan struct{}, window)
	for range window {
		tokens <- struct{}{}
	}
	readErr := make(chan error, 1)
	go func() { // PINGRESP reader
		var buf []byte
		for {
			h, body, err := readPacket(c.R, buf)
			buf = body
			if err != nil {
				readErr <- err
				return
			}
			if h>>4 == pktPingresp {
				tokens <- struct{}{}
			}
		}
	}()
	payload := make([]byte, payloadSize)
	for i := 8; i < payloadSize; i++ {
		payload[i] = 'x'
	}
	out := make([]byte, 0, batch*(payloadSize+len(topic)+8)+2)
	var seq uint32
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var err error
loop:
	for time.Now().Before(deadline) {
		select {
		case <-tokens:
		case <-timer.C:
			break loop
		case <-ctx.Done():
			break loop
		case err = <-readErr:
			break loop
		}
		out = out[:0]
		for range batch {
			out = appendPublish(out, topic, 0, 0, telemetry(payload, pub, seq))
			seq++
		}
		out = append(out, pingreqPacket...)
		c.TLS.SetWriteDeadline(time.Now().Add(20 * time.Second))
		if _, err = c.TLS.Write(out); err != nil {
			seq -= batch
			break
		}
	}
	if err == nil { // until the broker has read everything
		err = waitTokens(tokens, window, readErr)
	}
	c.TLS.Close()
	return int64(seq), err
}

func waitTokens(tokens chan struct{}, window int, readErr chan error) error {
	wait := time.NewTimer(20 * time.Second)
	defer wait.Stop()
	for len(tokens) < window {
		select {
		case <-wait.C:
			return fmt.Errorf("%d acknowledgements outstanding after 20 s", window-len(tokens))
		case err := <-readErr:
			return err
		case <-time.After(2 * time.Millisecond):
		}
	}
	return nil
}

func publishQoS1(ctx context.Context, c *Conn, pub uint32, topic string, deadline time.Time, window int, acked *bitset) (int64, error) {
	tokens := make(chan struct{}, window)
	for range window {
		tokens <- struct{}{}
	}
	var ids [65536]uint32 // packet ID -> seq
	var mu sync.Mutex
	var nacked int64
	readErr := make(chan error, 1)
	go func() { // PUBACK reader
		var buf []byte
		for {
			h, body, err := readPacket(c.R, buf)
			buf = body
			if err != nil {
				readErr <- err
				return
			}
			if h>>4 == pktPuback && len(body) >= 2 {
				id := binary.BigEndian.Uint16(body)
				mu.Lock()
				acked.set(ids[id])
				nacked++
				mu.Unlock()
				tokens <- struct{}{}
			}
		}
	}()
	payload := make([]byte, payloadSize)
	for i := 8; i < payloadSize; i++ {
		payload[i] = 'x'
	}
	out := make([]byte, 0, window*(payloadSize+len(topic)+10))
	var seq uint32
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var err error
loop:
	for time.Now().Before(deadline) {
		select {
		case <-tokens:
		case <-timer.C:
			break loop
		case <-ctx.Done():
			break loop
		case err = <-readErr:
			break loop
		}
		out = out[:0]
		for n := 1; ; n++ {
			id := uint16(seq%65535) + 1
			mu.Lock()
			ids[id] = seq
			mu.Unlock()
			out = appendPublish(out, topic, 1, id, telemetry(payload, pub, seq))
			seq++
			if n == window {
				break
			}
			select {
			case <-tokens:
				continue
			default:
			}
			break
		}
		c.TLS.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err = c.TLS.Write(out); err != nil {
			break
		}
	}
	if err == nil { // wait (bounded) for the outstanding PUBACKs
		err = waitTokens(tokens, window, readErr)
	}
	c.TLS.Close() // stops the reader
	mu.Lock()
	defer mu.Unlock()
	return nacked, err
}

// ---- 5, 6: idle connections, revocation ----

// IdleResult are the live idle connections, closed by Close.
type idleConns []*Conn

func (ic idleConns) Close() {
	for _, c := range ic {
		if c == nil {
			continue
		}
		if tc, ok := c.TLS.NetConn().(*net.TCPConn); ok {
			tc.SetLinger(0) // RST: no TIME_WAIT for thousands of ports
		}
		c.TLS.Close()
	}
}

// Idle connects devices [0, n) and keeps them open without traffic; it
// reports the broker's RSS per connection (RSS after minus RSS before,
// divided by n) and the time to connect all. then, if set, runs while they
// are connected.
func (e *Env) Idle(ctx context.Context, b *Broker, n, workers int, then func() (Values, error)) (Values, error) {
	dialer := &Dialer{Addr: b.MQTT, ServerName: "localhost", Timeout: 60 * time.Second}
	time.Sleep(time.Second)
	before, err := RSS(b.PID)
	if err != nil {
		return nil, err
	}
	goBefore := goMemory(b)
	meter, _ := startCPU(b.PID)
	conns := make(idleConns, n)
	defer conns.Close()
	start := time.Now()
	if err := parallel(ctx, n, workers, func(i int) error {
		c, err := dialer.Connect(ctx, e.ClientTLS(e.Devices[i], nil), e.Devices[i].Name, 900, 16)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Devices[i].Name, err)
		}
		conns[i] = c
		return nil
	}); err != nil {
		return nil, err
	}
	took := time.Since(start)
	cpu, _ := meter.since()
	time.Sleep(3 * time.Second) // let the broker settle (Go: background GC)
	after, err := RSS(b.PID)
	if err != nil {
		return nil, err
	}
	v := Values{
		"connect all s":      took.Seconds(),
		"RSS KB/conn":        float64(after-before) / 1024 / float64(n),
		"RSS MB total":       float64(after) / (1 << 20),
		"broker CPU µs/conn": us(cpu) / float64(n),
		"connections":        float64(n),
	}
	// For a Go broker, where the memory is: heap in use, and goroutine
	// stacks (from its /metrics).
	if goAfter := goMemory(b); goBefore != nil && goAfter != nil {
		for _, k := range []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes"} {
			name := map[string]string{"go_memstats_heap_inuse_bytes": "Go heap KB/conn", "go_memstats_stack_inuse_bytes": "Go stacks KB/conn"}[k]
			v[name] = (goAfter[k] - goBefore[k]) / 1024 / float64(n)
		}
	}
	if then != nil {
		w, err := then()
		if err != nil {
			return nil, err
		}
		for k, x := range w {
			v[k] = x
		}
	}
	return v, nil
}

// Revoke connects the given devices (in addition to whatever is connected),
// revokes them one by one through the admin API and measures the time from
// the revoke call starting to the device's connection being closed, then
// tries a resumed TLS session of each revoked device: it must be refused.
func (e *Env) Revoke(ctx context.Context, b *Broker, devices []Identity) (Values, error) {
	admin, err := e.Admin(b)
	if err != nil {
		return nil, err
	}
	dialer := &Dialer{Addr: b.MQTT, ServerName: "localhost"}
	type target struct {
		id     Identity
		cfg    *tls.Config
		conn   *Conn
		closed chan time.Time
	}
	ts := make([]*target, len(devices))
	for i, id := range devices {
		t := &target{id: id, cfg: e.ClientTLS(id, tls.NewLRUClientSessionCache(1)), closed: make(chan time.Time, 1)}
		// first connection fills the session cache; the second must resume
		c, err := dialer.Connect(ctx, t.cfg, id.Name, 900, 256)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", id.Name, err)
		}
		c.Disconnect()
		if t.conn, err = dialer.Connect(ctx, t.cfg, id.Name, 900, 256); err != nil {
			return nil, fmt.Errorf("%s: %w", id.Name, err)
		}
		go func() {
			var buf [256]byte
			for {
				if _, err := t.conn.R.Read(buf[:]); err != nil {
					t.closed <- time.Now()
					return
				}
			}
		}()
		ts[i] = t
	}
	defer func() {
		for _, t := range ts {
			if t != nil && t.conn != nil {
				t.conn.TLS.Close()
			}
		}
	}()
	var fromStart, fromReturn []time.Duration
	var resumedBefore, refused, admitted int
	for _, t := range ts {
		if t.conn.Resumed {
			resumedBefore++
		}
		t0 := time.Now()
		if _, err := admin.DeviceAction(ctx, t.id.Name, "revoke", "fleetbench"); err != nil {
			return nil, fmt.Errorf("revoke %s: %w", t.id.Name, err)
		}
		t1 := time.Now()
		select {
		case tc := <-t.closed:
			fromStart = append(fromStart, tc.Sub(t0))
			fromReturn = append(fromReturn, max(0, tc.Sub(t1)))
		case <-time.After(5 * time.Second):
			return nil, fmt.Errorf("%s: session still open 5 s after revoke", t.id.Name)
		}
		// the revoked device presents its cached TLS session again
		c, err := dialer.Connect(ctx, t.cfg, t.id.Name, 900, 256)
		if err != nil {
			refused++
		} else {
			admitted++
			c.TLS.Close()
		}
	}
	slices.Sort(fromStart)
	slices.Sort(fromReturn)
	return Values{
		"revoke→closed p50 ms":         ms(pct(fromStart, 0.5)),
		"revoke→closed p99 ms":         ms(pct(fromStart, 0.99)),
		"after call returned p99 ms":   ms(pct(fromReturn, 0.99)),
		"revoked, resumption refused":  float64(refused),
		"revoked, resumption admitted": float64(admitted),
		"resumed before revoke (of n)": float64(resumedBefore),
	}, nil
}

// ---- 7: enrollment ----

// EnrollTokens enrolls n new devices (token path, software keys, one HTTPS
// connection per enrollment as a device does) with `workers` concurrent
// clients; tokens are minted before the measurement.
func (e *Env) EnrollTokens(ctx context.Context, b *Broker, rep, n, workers int) (Values, error) {
	admin, err := e.Admin(b)
	if err != nil {
		return nil, err
	}
	toks := make([]string, n)
	ids := make([]string, n)
	if err := parallel(ctx, n, 8, func(i int) error {
		ids[i] = fmt.Sprintf("enroll-%d-%05d", rep, i)
		t, err := admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: ids[i], Group: "bench", TTL: time.Hour})
		if err != nil {
			return err
		}
		toks[i] = t.Token
		return nil
	}); err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	url := "https://" + b.API
	meter, err := startCPU(b.PID)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := parallel(ctx, n, workers, func(i int) error {
		return enrollWithToken(ctx, ids[i], filepath.Join(e.Work, "enroll", ids[i]), url, e.Roots, toks[i])
	}); err != nil {
		return nil, err
	}
	wall := time.Since(start)
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	return Values{
		"enrollments/s":        float64(n) / wall.Seconds(),
		"server CPU µs/enroll": us(cpu) / float64(n),
		"per core /s (CPU)":    float64(n) / cpu.Seconds(),
	}, nil
}

// goMemory reads the Go runtime's memory gauges from a broker's /metrics
// (nil for a broker without one).
func goMemory(b *Broker) map[string]float64 {
	if b.Metrics == "" {
		return nil
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + b.Metrics + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil
	}
	m := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		name, val, ok := strings.Cut(line, " ")
		if !ok || !strings.HasPrefix(name, "go_memstats_") {
			continue
		}
		if f, err := strconv.ParseFloat(val, 64); err == nil {
			m[name] = f
		}
	}
	return m
}
