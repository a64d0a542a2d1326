package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// DefaultMaxKeepalive is the longest keepalive a client is granted, in
// seconds (AWS IoT's bound; Mosquitto's max_keepalive is the same idea).
const DefaultMaxKeepalive = 1200

// keepaliveHook bounds how long an idle connection is held. A client that
// asks for keepalive 0 ("never time me out") or for more than the bound is
// granted the bound: an MQTT 5 client is told so in the CONNACK (Server
// Keep Alive, [MQTT-3.2.2-21]); an MQTT 3.1.1 client cannot be told, and is
// disconnected after 1.5 × the bound without a packet, as AWS IoT does.
// Without it a connection that sends nothing after its CONNECT holds its
// goroutine, buffers and session until the peer goes away, which a
// half-open TCP connection never does.
type keepaliveHook struct {
	mqtt.HookBase
	max uint16
}

func (h *keepaliveHook) ID() string { return "fleetgate-keepalive" }

func (h *keepaliveHook) Provides(b byte) bool { return b == mqtt.OnConnect }

// OnConnect runs before mochi sets the connection's read deadline from the
// keepalive and before the CONNACK is written.
func (h *keepaliveHook) OnConnect(cl *mqtt.Client, _ packets.Packet) error {
	if ka := cl.State.Keepalive; ka == 0 || ka > h.max {
		cl.State.Keepalive = h.max
		cl.State.ServerKeepalive = true
	}
	return nil
}
