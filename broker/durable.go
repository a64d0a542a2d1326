package broker

import (
	"bytes"
	"sync/atomic"
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
// When subscribers fall far behind, publishers wait (backpressure) rather
// than have their acknowledged messages dropped.
//
// Known limitation: the fanned-out copy's origin is the inline client, so
// an MQTT 5 No Local subscription of the publisher to its own topic also
// receives the message. fleetgate's default policy never lets a device
// subscribe to a topic it may publish to.
type fanoutFirstHook struct {
	mqtt.HookBase
	b      *Broker
	inline *mqtt.Client
}

func (h *fanoutFirstHook) ID() string { return "fleetgate-fanout-before-ack" }

// inflightHighWater bounds the QoS 1/2 messages the broker holds for
// subscribers that have not acknowledged them yet. mochi drops a message
// (after its publisher's PUBACK) when one subscriber holds MaximumInflight
// (65,535) of them; above this mark QoS 1/2 publishers wait instead, which
// their TCP connections turn into backpressure. One slow subscriber thus
// slows every QoS 1/2 publisher, and loses nothing.
const inflightHighWater = 50_000

// maxBackpressure bounds one publisher's wait; past it the message goes
// through (and may be dropped by mochi if the subscriber is still full).
const maxBackpressure = 30 * time.Second

func (h *fanoutFirstHook) backpressure(cl *mqtt.Client) {
	if atomic.LoadInt64(&h.b.server.Info.Inflight) < inflightHighWater {
		return
	}
	h.b.m.limited.WithLabelValues("backpressure").Inc()
	deadline := time.Now().Add(maxBackpressure)
	for atomic.LoadInt64(&h.b.server.Info.Inflight) >= inflightHighWater && time.Now().Before(deadline) {
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
	h.backpressure(cl)
	cp := pk.Copy(true)
	if err := h.b.server.InjectPacket(h.inline, cp); err != nil {
		// Fall back to mochi's own order rather than lose the message.
		h.b.log.Warn("fan-out before ack failed; acknowledging first", "client", cl.ID, "topic", pk.TopicName, "err", err)
		return pk, nil
	}
	return pk, packets.CodeSuccessIgnore
}
