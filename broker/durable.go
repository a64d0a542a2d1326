package broker

import (
	"bytes"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// fanoutFirstHook makes a PUBACK (or PUBREC) mean what a publisher takes it
// to mean: the message has been handed to every subscriber, and persisted
// for offline persistent sessions. mochi acknowledges a QoS 1/2 PUBLISH
// before it fans it out, so a broker killed between the two loses a message
// its publisher already considers delivered. This hook fans the message out
// first, through an inline client, and tells mochi to acknowledge the
// original without fanning it out again (CodeSuccessIgnore).
//
// When an online subscriber falls far behind, the publishers of messages
// for it wait (backpressure) rather than have their acknowledged messages
// dropped. An offline persistent session holds at most its quota; past it
// a message is delivered to every other subscriber and acknowledged, and
// not queued for that session (counted: session_quota_dropped_total).
//
// The fanned-out copy keeps the publisher as its origin (the fork keeps an
// origin an inline client gives), so retained messages name their device
// and MQTT 5 No Local applies.
type fanoutFirstHook struct {
	mqtt.HookBase
	b      *Broker
	inline *mqtt.Client
}

func (h *fanoutFirstHook) ID() string { return "fleetgate-fanout-before-ack" }

// sessionHighWater bounds the QoS 1/2 messages the broker holds for one
// online subscriber that has not acknowledged them yet. mochi drops a
// message (after its publisher's PUBACK) when one subscriber holds
// MaximumInflight (65,535) of them; above this mark the publishers of
// messages for that subscriber wait instead, which their TCP connections
// turn into backpressure. A slow subscriber thus slows the publishers of
// what it subscribes to, and loses nothing; publishers of other topics are
// not held back. Offline sessions never hold publishers back: they have a
// quota (Queues MaxOffline), past which their messages are counted and not
// queued for them (broker.go, offlineQuotaDropped).
//
// Until issue 11 the mark was broker-wide (50,000 messages held for anyone,
// offline sessions included), so one backend offline long enough made every
// QoS 1 publisher of the fleet wait 30 s per message.
const sessionHighWater = 50_000

// maxBackpressure bounds one publisher's wait; past it the message goes
// through (and may be dropped by mochi if the subscriber is still full).
const maxBackpressure = 30 * time.Second

// fullSubscriber reports whether an online subscriber of topic holds
// sessionHighWater unacknowledged messages.
func (h *fanoutFirstHook) fullSubscriber(topic string) bool {
	subs := h.b.server.Topics.CachedSubscribers(topic) // read-only, shared
	full := func(id string) bool {
		cl, ok := h.b.server.Clients.Get(id)
		return ok && !cl.Net.Inline && cl.Net.Conn != nil && !cl.Closed() && cl.State.Inflight.Len() >= sessionHighWater
	}
	for id := range subs.Subscriptions {
		if full(id) {
			return true
		}
	}
	for _, group := range subs.Shared {
		for id := range group {
			if full(id) {
				return true
			}
		}
	}
	return false
}

func (h *fanoutFirstHook) backpressure(cl *mqtt.Client, topic string) {
	if !h.fullSubscriber(topic) {
		return
	}
	h.b.m.limited.WithLabelValues("backpressure").Inc()
	deadline := time.Now().Add(maxBackpressure)
	for h.fullSubscriber(topic) && time.Now().Before(deadline) {
		if cl.Closed() {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func (h *fanoutFirstHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnPublish}, []byte{b})
}

func (h *fanoutFirstHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || pk.FixedHeader.Qos == 0 {
		return pk, nil
	}
	h.backpressure(cl, pk.TopicName)
	// The fanned-out copy shares the payload (nothing writes to a payload
	// once read; the fork's deliveries share it too, patch 23).
	payload := pk.Payload
	pk.Payload = nil
	cp := pk.Copy(true)
	pk.Payload = payload
	if len(payload) > 0 {
		cp.Payload = payload
	}
	if err := h.b.server.InjectPacket(h.inline, cp); err != nil {
		// Fall back to mochi's own order rather than lose the message.
		h.b.log.Warn("fan-out before ack failed; acknowledging first", "client", cl.ID, "topic", pk.TopicName, "err", err)
		return pk, nil
	}
	return pk, packets.CodeSuccessIgnore
}
