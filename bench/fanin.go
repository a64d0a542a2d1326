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
	// publish → delivery latency of every message: the publisher puts the
	// time it wrote the message in the payload (same clock, one process)
	var lat []time.Duration
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
			now := time.Now().UnixNano()
			lastRecv.Store(now)
			if len(payload) >= 16 {
				lat = append(lat, time.Duration(now-int64(binary.BigEndian.Uint64(payload[8:]))))
			}
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
	slices.Sort(lat)
	v["delivery p50 ms"] = ms(pct(lat, 0.50))
	v["delivery p99 ms"] = ms(pct(lat, 0.99))
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

// publishQoS1 keeps up to window QoS 1 PUBLISH unacknowledged, writing as
// many as there are free tokens at once, and records in acked the
// sequence of every message the broker acknowledged.
func publishQoS1(ctx context.Context, c *Conn, pub uint32, topic string, deadline time.Time, window int, acked *bitset) (int64, error) {
	var ids [65536]uint32 // packet ID -> seq
	var mu sync.Mutex
	var nacked int64
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
	var seq uint32
	err := p.run(ctx, deadline, 10*time.Second, make([]byte, 0, window*(payloadSize+len(topic)+10)), func(out []byte) []byte {
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
	return nacked, err
}
