package broker

import (
	"bytes"
	"encoding/json"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// EventsPrefix is where the broker announces connects and disconnects, for
// backend services (the default policy lets services and operators
// subscribe to $fleetgate/events/#; devices cannot):
//
//	$fleetgate/events/<role>/<name>/connected
//	$fleetgate/events/<role>/<name>/disconnected
//
// Payload: {"event","identity","remote","time","reason"}; QoS 1, not
// retained.
const EventsPrefix = "$fleetgate/events/"

// Event is the JSON payload of a broker event.
type Event struct {
	Event    string    `json:"event"`
	Identity string    `json:"identity"`
	Remote   string    `json:"remote,omitempty"`
	Time     time.Time `json:"time"`
	Reason   string    `json:"reason,omitempty"`
}

// eventsHook publishes the events from one goroutine, in order, through a
// bounded queue: the connecting or disconnecting client's goroutine never
// waits for a slow subscriber of the events (a full queue drops the event
// and counts it in fleetgate_broker_limit_hits_total{limit="events"}).
type eventsHook struct {
	mqtt.HookBase
	b *Broker
	q chan eventMsg
}

type eventMsg struct {
	topic   string
	payload []byte
}

// eventsQueue bounds the events waiting to be published.
const eventsQueue = 4096

func newEventsHook(b *Broker) *eventsHook {
	return &eventsHook{b: b, q: make(chan eventMsg, eventsQueue)}
}

// run publishes queued events until stop is closed.
func (h *eventsHook) run(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case m := <-h.q:
			if err := h.b.server.Publish(m.topic, m.payload, false, 1); err != nil {
				h.b.log.Debug("event not published", "topic", m.topic, "err", err)
			}
		}
	}
}

func (h *eventsHook) ID() string { return "fleetgate-events" }

func (h *eventsHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnSessionEstablished, mqtt.OnDisconnect}, []byte{b})
}

func (h *eventsHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.publish(cl, "connected", nil)
}

func (h *eventsHook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	if cl.Net.Conn == nil { // a session restored from storage, not a connection
		return
	}
	h.publish(cl, "disconnected", err)
}

func (h *eventsHook) publish(cl *mqtt.Client, event string, cause error) {
	s, ok := h.b.hook.Lookup(cl.ID)
	if !ok || cl.Net.Inline {
		return
	}
	ev := Event{Event: event, Identity: s.Identity.String(), Remote: cl.Net.Remote, Time: h.b.cfg.Now().UTC()}
	if cause != nil {
		ev.Reason = cause.Error()
	}
	payload, _ := json.Marshal(ev)
	topic := EventsPrefix + string(s.Identity.Role) + "/" + s.Identity.Name + "/" + event
	select {
	case h.q <- eventMsg{topic: topic, payload: payload}:
	default:
		h.b.m.limited.WithLabelValues("events").Inc()
		h.b.log.Warn("event dropped: events queue full", "topic", topic)
	}
}
