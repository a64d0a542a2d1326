package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/broker/auth"
)

// What a cluster node's router (broker/cluster, added through
// Config.Hooks) needs of the broker.

// FanoutClientID is the inline client through which the broker fans a
// QoS 1/2 message out before acknowledging it: its publishes are copies of
// messages hooks have already seen.
const FanoutClientID = fanoutClientID

// MQTT is the embedded mochi server.
func (b *Broker) MQTT() *mqtt.Server { return b.server }

// Auth is the authentication/ACL hook (sessions by client ID).
func (b *Broker) Auth() *auth.Hook { return b.hook }
