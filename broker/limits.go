package broker

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Limits bound what one client may cost the broker. Zero values take the
// defaults of DefaultLimits.
type Limits struct {
	// MsgRate is the sustained PUBLISH rate per client (messages/s), with
	// MsgBurst on top. Over it the client is disconnected: MQTT 5 clients
	// get DISCONNECT 0x96 (message rate too high). Dropping silently would
	// hide a misbehaving device; disconnecting makes it visible in metrics
	// and logs, and its reconnects are slowed by the TLS handshake.
	MsgRate  float64
	MsgBurst int
	// ByteRate is the sustained PUBLISH payload rate per client (bytes/s),
	// with ByteBurst on top; over it: DISCONNECT 0x97 (quota exceeded).
	ByteRate  float64
	ByteBurst int
	// MaxSubscriptions per client; further filters are refused in the
	// SUBACK (0x8F for MQTT 5, 0x80 for 3.1.1) and counted.
	MaxSubscriptions int
	// SubRate is the sustained rate of topic filters a device may send in
	// SUBSCRIBE and UNSUBSCRIBE packets (filters/s; a packet costs at least
	// one), with SubBurst on top. Over it the device is disconnected like
	// a publisher over MsgRate: MQTT 5 clients get DISCONNECT 0x96
	// (message rate too high). Each filter costs a match-tree update, and
	// in a persistent session a store write.
	SubRate  float64
	SubBurst int
	// MaxKeepalive is the longest keepalive granted, in seconds
	// (keepalive.go); a client asking for 0 or more gets this.
	MaxKeepalive uint16
}

// DefaultLimits suit sensors that report every few seconds and a backend
// that reads the fleet: services and operators are exempt from the
// per-client message limits (they are few and trusted).
var DefaultLimits = Limits{MsgRate: 100, MsgBurst: 200, ByteRate: 1 << 20, ByteBurst: 4 << 20, MaxSubscriptions: 32,
	SubRate: 10, SubBurst: 100, MaxKeepalive: DefaultMaxKeepalive}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MsgRate > 0 {
		d.MsgRate = l.MsgRate
	}
	if l.MsgBurst > 0 {
		d.MsgBurst = l.MsgBurst
	}
	if l.ByteRate > 0 {
		d.ByteRate = l.ByteRate
	}
	if l.ByteBurst > 0 {
		d.ByteBurst = l.ByteBurst
	}
	if l.MaxSubscriptions > 0 {
		d.MaxSubscriptions = l.MaxSubscriptions
	}
	if l.SubRate > 0 {
		d.SubRate = l.SubRate
	}
	if l.SubBurst > 0 {
		d.SubBurst = l.SubBurst
	}
	if l.MaxKeepalive > 0 {
		d.MaxKeepalive = l.MaxKeepalive
	}
	return d
}

// limitsHook enforces Limits and counts traffic. It provides no
// authentication or ACL decision.
type limitsHook struct {
	mqtt.HookBase
	b       *Broker
	l       Limits
	clients sync.Map // *mqtt.Client -> *clientLimits

	// byID holds each device identity's limiters, shared by its
	// connections and kept after its last one ended until they would be
	// full again (refillTime): a device that reconnects continues with
	// the tokens it had left, not with a fresh burst. Entries exist for
	// identities that authenticated, connected or recently (bounded by
	// the fleet), and are swept once per refillTime.
	mu      sync.Mutex
	byID    map[string]*clientLimits
	sweptAt time.Time

	msgsIn, bytesIn, msgsOut, bytesOut, dropped prometheus.Counter
	limited                                     *prometheus.CounterVec

	// refusals rate-limits the log lines of per-packet refusals per client
	// identity (see newRefusalLog); Init runs its summaries, Stop ends them.
	refusals *logguard.Limiter
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

type clientLimits struct {
	msgs, bytes, subs *rate.Limiter
	exempt            bool
	key               string    // in limitsHook.byID
	conns             int       // connections using it (under limitsHook.mu)
	idleSince         time.Time // when the last one ended
}

// refillTime is how long an unused set of limiters takes to be full again:
// after it, a fresh set is the same (at most a day: a rate so low is kept
// that long).
func (l Limits) refillTime() time.Duration {
	d := 0.0
	for _, r := range [][2]float64{{float64(l.MsgBurst), l.MsgRate}, {float64(l.ByteBurst), l.ByteRate}, {float64(l.SubBurst), l.SubRate}} {
		if r[1] > 0 {
			d = max(d, r[0]/r[1])
		}
	}
	return time.Duration(min(d, 24*3600)*float64(time.Second)) + time.Second
}

// newRefusalLog returns the limiter of per-packet refusal log lines
// (subscriptions over the limit, ACL denials, clients over a rate): five
// lines per client identity and minute, then one summary line.
func newRefusalLog(log *slog.Logger) *logguard.Limiter {
	return logguard.New(logguard.Options{Burst: 5, Window: time.Minute, MaxKeys: 4096, Global: logGlobal, Summaries: logGlobal,
		Summary: logguard.LogSummary(log, "client refusals not logged one by one")})
}

// Init starts the summaries of suppressed refusal log lines.
func (h *limitsHook) Init(any) error {
	if h.refusals == nil {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		h.refusals.Run(ctx)
	}()
	return nil
}

// Stop ends the summaries, writing the last ones.
func (h *limitsHook) Stop() error {
	if h.stop != nil {
		h.stop()
		h.wg.Wait()
		h.refusals.Flush()
	}
	return nil
}

// logRefusal reports whether a refusal concerning cl may be logged; the
// key is its identity, as for the auth hook's ACL denials.
func (h *limitsHook) logRefusal(cl *mqtt.Client) bool {
	if h.refusals == nil {
		return true
	}
	key := cl.ID
	if s, ok := h.b.hook.Session(cl); ok {
		key = s.Identity.String()
	}
	return h.refusals.Allow(key)
}

func (h *limitsHook) ID() string { return "fleetgate-limits" }

func (h *limitsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnPacketRead, mqtt.OnPacketSent, mqtt.OnSubscribe, mqtt.OnDisconnect, mqtt.OnSessionEstablished, mqtt.OnPublishDropped}, []byte{b})
}

func (h *limitsHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	key := "client/" + cl.ID
	if s, ok := h.b.hook.Session(cl); ok {
		if s.Identity.Role != "device" {
			h.clients.Store(cl, &clientLimits{exempt: true})
			return
		}
		key = s.Identity.String()
	}
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.byID == nil {
		h.byID = map[string]*clientLimits{}
	}
	if refill := h.l.refillTime(); now.Sub(h.sweptAt) >= refill {
		h.sweptAt = now
		for k, c := range h.byID {
			if c.conns == 0 && now.Sub(c.idleSince) >= refill {
				delete(h.byID, k)
			}
		}
	}
	c := h.byID[key]
	if c == nil {
		c = &clientLimits{
			msgs:  rate.NewLimiter(rate.Limit(h.l.MsgRate), h.l.MsgBurst),
			bytes: rate.NewLimiter(rate.Limit(h.l.ByteRate), h.l.ByteBurst),
			subs:  rate.NewLimiter(rate.Limit(h.l.SubRate), h.l.SubBurst),
			key:   key,
		}
		h.byID[key] = c
	}
	c.conns++
	h.clients.Store(cl, c)
}

func (h *limitsHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	v, ok := h.clients.LoadAndDelete(cl)
	if !ok {
		return
	}
	if c := v.(*clientLimits); !c.exempt {
		h.mu.Lock()
		if c.conns--; c.conns == 0 {
			c.idleSince = time.Now()
		}
		h.mu.Unlock()
	}
}

func (h *limitsHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	switch pk.FixedHeader.Type {
	case packets.Subscribe, packets.Unsubscribe:
		return h.subscribeRead(cl, pk)
	case packets.Publish:
	default:
		return pk, nil
	}
	n := len(pk.Payload)
	h.msgsIn.Inc()
	h.bytesIn.Add(float64(n))
	v, ok := h.clients.Load(cl)
	if !ok {
		return pk, nil
	}
	c := v.(*clientLimits)
	if c.exempt {
		return pk, nil
	}
	code := packets.CodeSuccess
	now := time.Now() // one clock read for both limiters
	switch {
	case !c.msgs.AllowN(now, 1):
		code = packets.ErrMessageRateTooHigh
	case !c.bytes.AllowN(now, n):
		code = packets.ErrQuotaExceeded
	default:
		return pk, nil
	}
	reason := "message_rate"
	if code == packets.ErrQuotaExceeded {
		reason = "byte_rate"
	}
	return h.overLimit(cl, pk, reason, code)
}

// subscribeRead applies SubRate to a SUBSCRIBE or UNSUBSCRIBE: each of its
// filters costs a token.
func (h *limitsHook) subscribeRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	v, ok := h.clients.Load(cl)
	if !ok {
		return pk, nil
	}
	c := v.(*clientLimits)
	if c.exempt {
		return pk, nil
	}
	n := max(len(pk.Filters), 1)
	if c.subs.AllowN(time.Now(), n) {
		return pk, nil
	}
	return h.overLimit(cl, pk, "subscribe_rate", packets.ErrMessageRateTooHigh)
}

// overLimit disconnects a client over a rate (MQTT 5: DISCONNECT with code)
// and rejects the packet.
func (h *limitsHook) overLimit(cl *mqtt.Client, pk packets.Packet, reason string, code packets.Code) (packets.Packet, error) {
	h.limited.WithLabelValues(reason).Inc()
	if h.logRefusal(cl) {
		h.b.log.Warn("client over its limit, disconnecting", "reason", reason, "client", logguard.Clip(cl.ID, 0), "remote", cl.Net.Remote)
	}
	_ = h.b.server.DisconnectClient(cl, code)
	return pk, packets.ErrRejectPacket
}

func (h *limitsHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, b []byte) {
	if pk.FixedHeader.Type == packets.Publish {
		h.msgsOut.Inc()
		h.bytesOut.Add(float64(len(pk.Payload)))
	}
}

// OnPublishDropped counts QoS 0 messages dropped because a subscriber's
// outbound queue stayed full (see the queue policies in broker.go).
func (h *limitsHook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	h.dropped.Inc()
	h.b.log.Debug("QoS 0 message dropped: subscriber's queue full", "client", cl.ID, "topic", pk.TopicName)
}

// OnSubscribe refuses filters beyond MaxSubscriptions by making them
// invalid, which mochi answers in the SUBACK.
func (h *limitsHook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	have := cl.State.Subscriptions.Len()
	for i := range pk.Filters {
		if _, exists := cl.State.Subscriptions.Get(pk.Filters[i].Filter); exists {
			continue
		}
		if have >= h.l.MaxSubscriptions {
			h.limited.WithLabelValues("subscriptions").Inc()
			if h.logRefusal(cl) {
				h.b.log.Warn("subscription refused: limit reached", "client", logguard.Clip(cl.ID, 0),
					"filter", logguard.Clip(pk.Filters[i].Filter, 0), "limit", h.l.MaxSubscriptions)
			}
			pk.Filters[i].Filter = "" // invalid: refused in the SUBACK
			continue
		}
		have++
	}
	return pk
}

// logGlobal bounds, per minute and across all sources, the refusal lines
// each of the broker's refusal logs writes in full and the summaries it
// writes (logguard's Global and Summaries): however many addresses or
// identities a flood uses, a log grows by a few hundred lines a minute.
const logGlobal = 100
