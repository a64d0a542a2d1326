package devicesdk

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// ConnectOptions tune the MQTT connection.
type ConnectOptions struct {
	// BrokerAddr is host:port of the broker's mTLS listener.
	BrokerAddr string
	// OtherBrokers are further host:port addresses (the other nodes of a
	// cluster), tried in order when BrokerAddr cannot be reached, on the
	// first connection and on every reconnection.
	OtherBrokers []string
	// ServerName overrides the TLS server name (default: host of BrokerAddr).
	ServerName string
	// CleanSession false keeps subscriptions and queued QoS 1 messages
	// across reconnects (default false: persistent session).
	CleanSession bool
	KeepAlive    time.Duration
	// AutoReconnect reconnects with backoff after a lost connection, up to
	// MaxReconnectInterval between attempts (default 30s).
	AutoReconnect        bool
	MaxReconnectInterval time.Duration
	OnConnect            func()
	OnLost               func(error)
}

// Client is a connected device.
type Client struct {
	id     string
	c      paho.Client
	d      *Device
	broker *atomic.Value // host:port of the latest connection attempt
	acks   *AckStore     // what the broker acknowledged (acks.go)
}

// Connect opens an MQTT session to the broker with the device certificate.
// The client ID is the device ID, as the broker requires.
func (d *Device) Connect(ctx context.Context, o ConnectOptions) (*Client, error) {
	sn := o.ServerName
	if sn == "" {
		host, _, err := net.SplitHostPort(o.BrokerAddr)
		if err != nil {
			return nil, fmt.Errorf("devicesdk: broker address %q: %w", o.BrokerAddr, err)
		}
		sn = host
	}
	tcfg, err := d.TLSConfig(sn)
	if err != nil {
		return nil, err
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = 60 * time.Second
	}
	if o.MaxReconnectInterval <= 0 {
		o.MaxReconnectInterval = 30 * time.Second
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + o.BrokerAddr).
		SetClientID(d.cfg.DeviceID).
		SetTLSConfig(tcfg).
		SetCleanSession(o.CleanSession).
		SetKeepAlive(o.KeepAlive).
		SetConnectTimeout(15 * time.Second).
		SetAutoReconnect(o.AutoReconnect).
		SetMaxReconnectInterval(o.MaxReconnectInterval).
		SetConnectRetry(false).
		SetOrderMatters(false)
	acks := NewAckStore()
	opts.SetStore(acks)
	// One handler for every message: a persistent session may deliver
	// queued messages right after CONNACK, before this client subscribed
	// again, and paho acknowledges (and drops) a message nobody handles.
	opts.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { d.dispatch(m) })
	for _, a := range o.OtherBrokers {
		opts.AddBroker("tls://" + a)
	}
	broker := &atomic.Value{}
	opts.SetConnectionAttemptHandler(func(u *url.URL, c *tls.Config) *tls.Config {
		broker.Store(u.Host)
		return c
	})
	if o.OnConnect != nil {
		opts.SetOnConnectHandler(func(paho.Client) { o.OnConnect() })
	}
	if o.OnLost != nil {
		opts.SetConnectionLostHandler(func(_ paho.Client, err error) { o.OnLost(err) })
	}
	c := paho.NewClient(opts)
	if err := wait(ctx, c.Connect()); err != nil {
		return nil, fmt.Errorf("devicesdk: connect %s: %w", o.BrokerAddr, err)
	}
	return &Client{id: d.cfg.DeviceID, c: c, d: d, broker: broker, acks: acks}, nil
}

// Broker is the host:port of the connection's latest attempt: while
// IsConnected, the broker the client is connected to.
func (c *Client) Broker() string {
	s, _ := c.broker.Load().(string)
	return s
}

type route struct {
	filter string
	fn     func(Message)
}

// Handle registers fn for messages matching filter, on this and every later
// connection of the device. A later Handle for the same filter replaces it.
func (d *Device) Handle(filter string, fn func(Message)) {
	d.routeMu.Lock()
	defer d.routeMu.Unlock()
	for i := range d.routes {
		if d.routes[i].filter == filter {
			d.routes[i].fn = fn
			return
		}
	}
	d.routes = append(d.routes, route{filter, fn})
}

func (d *Device) dispatch(m paho.Message) {
	d.routeMu.RLock()
	defer d.routeMu.RUnlock()
	for _, r := range d.routes {
		if topicMatches(stripShare(r.filter), m.Topic()) {
			r.fn(Message{Topic: m.Topic(), Payload: m.Payload()})
		}
	}
}

func stripShare(f string) string {
	if rest, ok := strings.CutPrefix(f, "$share/"); ok {
		if _, after, ok := strings.Cut(rest, "/"); ok {
			return after
		}
	}
	return f
}

// topicMatches is MQTT filter matching for a concrete topic.
func topicMatches(filter, topic string) bool {
	for {
		fl, frest, fmore := strings.Cut(filter, "/")
		if fl == "#" {
			return true
		}
		tl, trest, tmore := strings.Cut(topic, "/")
		if fl != "+" && fl != tl {
			return false
		}
		if !fmore || !tmore {
			return fmore == tmore || (tmore == false && frest == "#")
		}
		filter, topic = frest, trest
	}
}

// ErrTimeout: the broker did not answer in time (or ctx ended).
var ErrTimeout = errors.New("devicesdk: no answer from broker")

// DefaultTimeout bounds a wait for the broker when ctx has no deadline. A
// broker closes an MQTT 3.1.1 connection on a refused QoS 1/2 publish (3.1.1
// has no negative PUBACK), and paho then never completes the token.
const DefaultTimeout = 30 * time.Second

func wait(ctx context.Context, t paho.Token) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return fmt.Errorf("%w: %v", ErrTimeout, ctx.Err())
	}
}

// Topic names of a device (docs/policy.md).
func TelemetryTopic(id, name string) string { return "devices/" + id + "/telemetry/" + name }

// StateTopic is where a device publishes its (retained) state.
func StateTopic(id string) string { return "devices/" + id + "/state" }

// CommandsFilter is the filter of a device's commands.
func CommandsFilter(id string) string { return "devices/" + id + "/commands/#" }

// BroadcastFilter is the filter of a group's broadcasts.
func BroadcastFilter(group string) string { return "groups/" + group + "/broadcast/#" }

// PublishTelemetry publishes to devices/<id>/telemetry/<name>.
func (c *Client) PublishTelemetry(ctx context.Context, name string, qos byte, payload []byte) error {
	return c.Publish(ctx, TelemetryTopic(c.id, name), qos, false, payload)
}

// PublishState publishes the device state, retained.
func (c *Client) PublishState(ctx context.Context, payload []byte) error {
	return c.Publish(ctx, StateTopic(c.id), 1, true, payload)
}

// Publish publishes to any topic (the broker's policy decides). For QoS
// 1/2 it returns nil only once the broker acknowledged the message, also
// when the connection broke and paho resent it (acks.go); an error means
// the broker may not have it (paho may still be resending it: QoS 1 is at
// least once).
func (c *Client) Publish(ctx context.Context, topic string, qos byte, retain bool, payload []byte) error {
	return c.acks.Wait(ctx, c.c.Publish(topic, qos, retain, payload))
}

// Message is a received message.
type Message struct {
	Topic   string
	Payload []byte
}

// SubscribeCommands subscribes to devices/<id>/commands/#.
func (c *Client) SubscribeCommands(ctx context.Context, qos byte, fn func(Message)) error {
	return c.Subscribe(ctx, CommandsFilter(c.id), qos, fn)
}

// ErrSubscriptionRefused: the broker refused the filter (SUBACK 0x80).
var ErrSubscriptionRefused = errors.New("devicesdk: subscription refused by broker")

// Subscribe subscribes to any filter (the broker's policy decides).
func (c *Client) Subscribe(ctx context.Context, filter string, qos byte, fn func(Message)) error {
	c.d.Handle(filter, fn)
	t := c.c.Subscribe(filter, qos, nil) // delivered through the default handler
	if err := wait(ctx, t); err != nil {
		return err
	}
	st := t.(*paho.SubscribeToken)
	if code, ok := st.Result()[filter]; ok && code >= 0x80 {
		return fmt.Errorf("%w: %s (code 0x%02x)", ErrSubscriptionRefused, filter, code)
	}
	return nil
}

// IsConnected reports whether the session is up.
func (c *Client) IsConnected() bool { return c.c.IsConnectionOpen() }

// Close disconnects cleanly.
func (c *Client) Close() { c.c.Disconnect(250) }
