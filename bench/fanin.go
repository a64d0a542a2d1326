package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Scenarios 3 and 4: QoS 0 and QoS 1 fan-in.

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

// telemetrySub is the backend's subscription to devices/+/telemetry/#:
// it records each message's (publisher, sequence) and its publish →
// delivery latency, and acknowledges every QoS 1 delivery.
type telemetrySub struct {
	conn     *Conn
	received []bitset // per publisher: the sequences received
	lat      []time.Duration
	recv     atomic.Int64 // distinct messages
	dups     atomic.Int64
	bad      atomic.Int64
	lastRecv atomic.Int64 // Unix nanoseconds of the last arrival
	done     chan error
	stopped  sync.Once
	stopping atomic.Bool
	// cut is when the broker ended the subscription's connection (Unix
	// nanoseconds; 0: it did not): what was sent after it counts as lost
	cut atomic.Int64
}

// cutErr says whether the broker closed the subscriber's connection.
func (s *telemetrySub) cutErr() error {
	if t := s.cut.Load(); t != 0 {
		return fmt.Errorf("the broker closed the subscriber's connection at %s: messages after it count as lost", time.Unix(0, t).UTC().Format("15:04:05.000"))
	}
	return nil
}

// subscribeTelemetry connects the backend to addr, subscribes with qos and
// reads until stop.
func (e *Env) subscribeTelemetry(ctx context.Context, addr string, pubs int, qos byte) (*telemetrySub, error) {
	dialer := &Dialer{Addr: addr, ServerName: "localhost"}
	conn, err := dialer.Connect(ctx, e.ClientTLS(e.Backend, nil), e.Backend.Name, 300, 256<<10)
	if err != nil {
		return nil, fmt.Errorf("subscriber: %w", err)
	}
	if err := conn.Subscribe("devices/+/telemetry/#", qos); err != nil {
		conn.TLS.Close()
		return nil, err
	}
	s := &telemetrySub{conn: conn, received: make([]bitset, pubs), done: make(chan error, 1)}
	go s.read(pubs)
	return s, nil
}

func (s *telemetrySub) read(pubs int) {
	var buf []byte
	out := make([]byte, 0, 64<<10)
	r := s.conn.R
	for {
		h, body, err := readPacket(r, buf)
		buf = body
		if err != nil {
			if !s.stopping.Load() {
				s.cut.Store(time.Now().UnixNano())
			}
			s.done <- err
			return
		}
		if h>>4 != pktPublish {
			continue
		}
		_, id, payload, err := publishFields(h, body)
		if err != nil || len(payload) < 8 {
			s.bad.Add(1)
			continue
		}
		p, seq := binary.BigEndian.Uint32(payload), binary.BigEndian.Uint32(payload[4:])
		if int(p) >= pubs {
			s.bad.Add(1)
			continue
		}
		if s.received[p].set(seq) {
			s.dups.Add(1)
		} else {
			s.recv.Add(1)
		}
		now := time.Now().UnixNano()
		s.lastRecv.Store(now)
		if len(payload) >= 16 {
			s.lat = append(s.lat, time.Duration(now-int64(binary.BigEndian.Uint64(payload[8:]))))
		}
		if (h>>1)&3 > 0 {
			out = appendPuback(out, id)
		}
		if len(out) > 0 && (r.Buffered() == 0 || len(out) > 60<<10) {
			if _, err := s.conn.TLS.Write(out); err != nil {
				s.done <- err
				return
			}
			out = out[:0]
		}
	}
}

// drain waits until want messages have arrived, or nothing arrived for
// 3 s; at most 30 s.
func (s *telemetrySub) drain(ctx context.Context, want int64) {
	for i := 0; i < 300 && ctx.Err() == nil && s.recv.Load() < want; i++ {
		time.Sleep(100 * time.Millisecond)
		if time.Since(time.Unix(0, s.lastRecv.Load())) > 3*time.Second {
			break
		}
	}
}

// stop closes the subscription and waits for its reader: from then on its
// records are read without a lock. It may be called again.
func (s *telemetrySub) stop() {
	s.stopped.Do(func() {
		s.stopping.Store(true)
		s.conn.TLS.Close()
		<-s.done
	})
}

// connectDevices connects devices [0, n), device i to addr(i), 32 at a
// time; on an error it closes those it connected.
func (e *Env) connectDevices(ctx context.Context, n int, addr func(i int) string) ([]*Conn, error) {
	conns := make([]*Conn, n)
	err := parallel(ctx, n, 32, func(i int) error {
		dialer := &Dialer{Addr: addr(i), ServerName: "localhost"}
		c, err := dialer.Connect(ctx, e.ClientTLS(e.Devices[i], nil), e.Devices[i].Name, 300, 4096)
		conns[i] = c
		return err
	})
	if err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []*Conn) {
	for _, c := range conns {
		if c != nil {
			c.TLS.Close()
		}
	}
}

// lost counts the messages acknowledged to their publisher (acked, per
// publisher) that never arrived.
func (s *telemetrySub) lost(acked []bitset) int64 {
	var lost int64
	for i := range acked {
		for w, word := range acked[i] {
			for bit := range 64 {
				if word&(1<<bit) != 0 && !s.received[i].has(uint32(w*64+bit)) {
					lost++
				}
			}
		}
	}
	return lost
}

// latencies are the sorted publish → delivery latencies (after stop).
func (s *telemetrySub) latencies() []time.Duration {
	slices.Sort(s.lat)
	return s.lat
}

// FanIn connects one backend subscriber on devices/+/telemetry/# and pubs
// devices publishing 64-byte telemetry as fast as the broker takes it for
// d, or, with rate > 0 (QoS 1), rate messages per second in all, evenly
// paced. QoS 0: batches of 32 PUBLISH per TLS write, paced by PINGREQ.
// QoS 1: each publisher keeps up to window PUBLISH unacknowledged; the
// subscriber acknowledges every delivery. A message counts as lost when its
// publisher got a PUBACK (QoS 1) or wrote it (QoS 0) and the subscriber
// never received it. In a cluster the subscriber is on the last node and
// the publishers spread over the others: every message crosses nodes.
func (e *Env) FanIn(ctx context.Context, b *Broker, pubs int, qos byte, d time.Duration, window int, rate float64) (Values, error) {
	sub, err := e.subscribeTelemetry(ctx, b.subNode().MQTT, pubs, qos)
	if err != nil {
		return nil, err
	}
	defer sub.stop()
	conns, err := e.connectDevices(ctx, pubs, func(i int) string { return b.pubNode(i).MQTT })
	if err != nil {
		return nil, fmt.Errorf("publishers: %w", err)
	}
	defer closeAll(conns)

	topics := make([]string, pubs)
	for i := range topics {
		topics[i] = "devices/" + e.Devices[i].Name + "/telemetry"
	}
	acked := make([]bitset, pubs)
	sent := make([]int64, pubs)
	var pubErrs atomic.Int64
	var firstErr atomic.Value
	q1 := qos1Opts{window: window}
	if rate > 0 {
		q1.every = time.Duration(float64(pubs) / rate * float64(time.Second))
	}

	meter, err := startCPU(b.PIDs()...)
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
				sent[i], _, err = publishQoS1(ctx, conns[i], uint32(i), topics[i], deadline, q1, &acked[i])
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
	// arrived
	var total int64
	for i := range pubs {
		total += sent[i]
	}
	sub.drain(ctx, total)
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	sub.stop()

	got := sub.recv.Load()
	lost := sub.lost(acked)
	if qos == 0 {
		lost = max(0, total-got)
	}
	last := time.Unix(0, sub.lastRecv.Load())
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
	lat := sub.latencies()
	v["delivery p50 ms"] = ms(pct(lat, 0.50))
	v["delivery p99 ms"] = ms(pct(lat, 0.99))
	if qos > 0 {
		v["acked by broker"] = float64(total)
		v["acked msgs/s"] = float64(total) / pubEnd.Sub(start).Seconds()
		v["duplicates"] = float64(sub.dups.Load())
	} else {
		v["sent"] = float64(total)
	}
	if pubErrs.Load() > 0 {
		e.Logf("    %s: %d publishers failed, first: %v", b.Name, pubErrs.Load(), firstErr.Load())
	}
	return v, sub.cutErr()
}

// telemetry fills buf with (publisher, sequence, time written in Unix
// nanoseconds); the rest is padding.
func telemetry(buf []byte, pub, seq uint32) []byte {
	buf = buf[:payloadSize]
	binary.BigEndian.PutUint32(buf, pub)
	binary.BigEndian.PutUint32(buf[4:], seq)
	binary.BigEndian.PutUint64(buf[8:], uint64(time.Now().UnixNano()))
	return buf
}

// newPayload is a telemetry buffer: (publisher, sequence, time), then padding.
func newPayload() []byte {
	payload := make([]byte, payloadSize)
	for i := 16; i < payloadSize; i++ {
		payload[i] = 'x'
	}
	return payload
}

// pacer is what the QoS 0 and QoS 1 publishers share: window tokens, one
// taken per burst written and one given back for each packet of the
// broker's that answers (a PINGRESP, a PUBACK), so that what sits unread
// in socket buffers is bounded and "sent" is what the broker took.
type pacer struct {
	c       *Conn
	window  int
	tokens  chan struct{}
	readErr chan error
}

// newPacer starts the reader of c; answers says whether a packet returns
// a token.
func newPacer(c *Conn, window int, answers func(h byte, body []byte) bool) *pacer {
	p := &pacer{c: c, window: window, tokens: make(chan struct{}, window), readErr: make(chan error, 1)}
	for range window {
		p.tokens <- struct{}{}
	}
	go func() {
		var buf []byte
		for {
			h, body, err := readPacket(c.R, buf)
			buf = body
			if err != nil {
				p.readErr <- err
				return
			}
			if answers(h, body) {
				p.tokens <- struct{}{}
			}
		}
	}()
	return p
}

// run writes burst(out[:0]) each time a token is free, until the deadline,
// ctx or a read error; after a failed write it calls unsent (if set). Then
// it waits (bounded) until every burst is answered and closes the
// connection, which stops the reader.
func (p *pacer) run(ctx context.Context, deadline time.Time, writeTimeout time.Duration, out []byte, burst func([]byte) []byte, unsent func()) error {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var err error
loop:
	for time.Now().Before(deadline) {
		select {
		case <-p.tokens:
		case <-timer.C:
			break loop
		case <-ctx.Done():
			break loop
		case err = <-p.readErr:
			break loop
		}
		out = burst(out[:0])
		p.c.TLS.SetWriteDeadline(time.Now().Add(writeTimeout))
		if _, err = p.c.TLS.Write(out); err != nil {
			if unsent != nil {
				unsent()
			}
			break
		}
	}
	if err == nil {
		err = waitTokens(p.tokens, p.window, p.readErr)
	}
	p.c.TLS.Close()
	return err
}

// publishQoS0 writes batches of 32 QoS 0 PUBLISH, each followed by a
// PINGREQ, with at most 4 batches not yet answered by a PINGRESP: a broker
// handles a connection's packets in order, so a PINGRESP says it has read
// the batch before it. That bounds what sits unread in socket buffers, so
// "sent" is what the broker took and loss is what it dropped.
func publishQoS0(ctx context.Context, c *Conn, pub uint32, topic string, deadline time.Time) (int64, error) {
	const batch, window = 32, 4
	p := newPacer(c, window, func(h byte, _ []byte) bool { return h>>4 == pktPingresp })
	payload := newPayload()
	var seq uint32
	err := p.run(ctx, deadline, 20*time.Second, make([]byte, 0, batch*(payloadSize+len(topic)+8)+2), func(out []byte) []byte {
		for range batch {
			out = appendPublish(out, topic, 0, 0, telemetry(payload, pub, seq))
			seq++
		}
		return append(out, pingreqPacket...)
	}, func() { seq -= batch })
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

// qos1Opts shape a QoS 1 publisher.
type qos1Opts struct {
	window int           // PUBLISH unacknowledged at most
	every  time.Duration // paced: one PUBLISH per interval (0: as fast as the window allows)
	seq    uint32        // the first sequence number
}

// publishQoS1 keeps up to o.window QoS 1 PUBLISH unacknowledged, writing as
// many as there are free tokens at once (paced: one per o.every), and
// records in acked the sequence of every message the broker acknowledged.
// It returns how many were acknowledged and the next sequence number.
func publishQoS1(ctx context.Context, c *Conn, pub uint32, topic string, deadline time.Time, o qos1Opts, acked *bitset) (int64, uint32, error) {
	var ids [65536]uint32 // packet ID -> seq
	var mu sync.Mutex
	var nacked int64
	window := max(o.window, 1)
	p := newPacer(c, window, func(h byte, body []byte) bool {
		if h>>4 != pktPuback || len(body) < 2 {
			return false
		}
		id := binary.BigEndian.Uint16(body)
		mu.Lock()
		acked.set(ids[id])
		nacked++
		mu.Unlock()
		return true
	})
	payload := newPayload()
	seq := o.seq
	start, k := time.Now(), 0
	err := p.run(ctx, deadline, 10*time.Second, make([]byte, 0, window*(payloadSize+len(topic)+10)), func(out []byte) []byte {
		if o.every > 0 {
			k++
			time.Sleep(time.Until(start.Add(time.Duration(k) * o.every)))
		}
		for n := 1; ; n++ {
			id := uint16(seq%65535) + 1
			mu.Lock()
			ids[id] = seq
			mu.Unlock()
			out = appendPublish(out, topic, 1, id, telemetry(payload, pub, seq))
			seq++
			if n == window || o.every > 0 {
				break
			}
			select {
			case <-p.tokens:
				continue
			default:
			}
			break
		}
		return out
	}, nil)
	mu.Lock()
	defer mu.Unlock()
	return nacked, seq, err
}
