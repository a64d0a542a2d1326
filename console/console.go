// Package console is fleetgate's web console: server-rendered pages
// (html/template, assets embedded in the binary, a few lines of JavaScript
// and no framework) on their own TLS listener, for operators who live in a
// browser. It shows the fleet (overview, devices with search and filters,
// a device's certificates, live session and audit trail), the audit log
// and the policy with an "explain" box, and it revokes, suspends and
// resumes devices through the operator API's own operations
// (operator.Server.DeviceAction), audited with the operator's name.
//
// Browsers sign in without client certificates: `fleetgate console login`
// asks the admin API, with the operator certificate, for a one-time link
// (MintLink: short life, single use, stored hashed, compared in constant
// time), which opens a short session held in a __Host- cookie (Secure,
// HttpOnly, SameSite=Strict). Every POST needs the session's CSRF token
// and a same-origin Origin header; the CSP allows no inline script or
// style. Roles (admin, read-only) are looked up on every request
// (Options.Role) and enforced here, not in the page.
//
// Live updates are server-sent events (/events) fed by the directory's
// watchers (device state, revocations), the broker's session watch
// (connected, disconnected) and the refusal counters (refused, by reason):
// bounded streams, heartbeats, slow clients dropped, streams ended when
// their session ends.
package console

import (
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Role is what an operator may do in the console.
type Role string

// Roles.
const (
	RoleAdmin    Role = "admin"
	RoleReadOnly Role = "read-only"
)

// Operations are the operator API's device operations (operator.Server).
type Operations interface {
	DeviceAction(op identity.Identity, id, action, reason string) (api.StateChangeResponse, error)
}

// Broker is what the console reads of the broker in this process.
type Broker interface {
	Connected(name string) bool
	Policy() *acl.Policy
}

// Options tune the console; zero values take the defaults.
type Options struct {
	// LinkTTL is the life of a sign-in link (2 minutes).
	LinkTTL time.Duration
	// SessionTTL is the life of a browser session (30 minutes, not
	// extended by use).
	SessionTTL time.Duration
	// MaxLinks bounds the links not used yet (64).
	MaxLinks int
	// MaxStreams bounds the live event streams (32), MaxStreamsPerSession
	// those of one session (4).
	MaxStreams, MaxStreamsPerSession int
	// StreamBuffer is the events queued for one stream; a stream whose
	// queue is full is dropped (64).
	StreamBuffer int
	// Heartbeat is the interval of comments on an idle stream (15 s).
	Heartbeat time.Duration
	// SampleEvery is the interval of the rate and refusal samples (5 s).
	SampleEvery time.Duration
	// Role returns an operator's role, asked on every request; nil:
	// every operator is an admin. An error ends the session.
	Role func(op identity.Identity) (Role, error)
	// Now is the clock (time.Now).
	Now func() time.Time
}

func (o *Options) defaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(d *int, v int) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.LinkTTL, 2*time.Minute)
	def(&o.SessionTTL, 30*time.Minute)
	def(&o.Heartbeat, 15*time.Second)
	def(&o.SampleEvery, 5*time.Second)
	defInt(&o.MaxLinks, 64)
	defInt(&o.MaxStreams, 32)
	defInt(&o.MaxStreamsPerSession, 4)
	defInt(&o.StreamBuffer, 64)
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Role == nil {
		o.Role = func(identity.Identity) (Role, error) { return RoleAdmin, nil }
	}
}

// Config configures a Console.
type Config struct {
	Options
	Registry   *registry.Registry
	Operations Operations
	// Broker is the broker of this process (nil: none; devices are never
	// online and there is no policy to show).
	Broker Broker
	// Gatherer holds the process's metrics (rates, refusals); may be nil.
	Gatherer prometheus.Gatherer
	Logger   *slog.Logger
	// BaseURL is the console's https://host:port, the start of its links.
	BaseURL string
}

// Console is the web console. Its Handler serves the pages; Run samples
// the metrics until its context ends.
type Console struct {
	cfg   Config
	opt   Options
	log   *slog.Logger
	auth  *auth
	hub   *hub
	stats *stats
	pages *pages
	mux   *http.ServeMux

	// live sessions seen by the broker's watch: device ID -> since, remote.
	liveMu sync.Mutex
	live   map[string]liveSession
}

type liveSession struct {
	Since  time.Time
	Remote string
}

// New returns a Console. Wire the broker's sessions to OnSession.
func New(cfg Config) (*Console, error) {
	if cfg.Registry == nil || cfg.Operations == nil {
		return nil, errors.New("console: Registry and Operations are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Options.defaults()
	c := &Console{cfg: cfg, opt: cfg.Options, log: cfg.Logger, live: map[string]liveSession{}}
	c.auth = newAuth(cfg.Options, cfg.Registry, cfg.BaseURL)
	c.hub = newHub(cfg.Options)
	c.stats = newStats(cfg.Gatherer, cfg.Options.Now)
	var err error
	if c.pages, err = newPages(c); err != nil {
		return nil, err
	}
	c.mux = c.routes()
	cfg.Registry.Watch(c.onDirectoryEvent)
	return c, nil
}

// SetBaseURL sets the start of the sign-in links (once the listener is
// bound).
func (c *Console) SetBaseURL(u string) { c.auth.setBaseURL(u) }

// MintLink mints a one-time sign-in link for op, bound to the operator
// certificate serial that asked (operator.ConsoleLinks).
func (c *Console) MintLink(op identity.Identity, serial string) (api.ConsoleLoginResponse, error) {
	return c.auth.mint(op, serial)
}

// Handler serves the console.
func (c *Console) Handler() http.Handler { return c }

// OnSession is told of the broker's authenticated connections
// (broker.WatchSessions); it must not block, and does not.
func (c *Console) OnSession(ev broker.SessionEvent) {
	if ev.Identity.Role != identity.RoleDevice {
		return
	}
	id := ev.Identity.Name
	c.liveMu.Lock()
	if ev.Connected {
		c.stats.connects.Add(1)
		c.live[id] = liveSession{Since: ev.Time, Remote: ev.Remote}
	} else {
		delete(c.live, id)
	}
	c.liveMu.Unlock()
	kind := "connected"
	if !ev.Connected {
		kind = "disconnected"
	}
	c.hub.publish(event{Type: kind, Device: id, Remote: ev.Remote, Time: ev.Time, Reason: ev.Reason})
}

// liveSession returns the live session of a device: since and remote when
// the broker's watch saw it connect.
func (c *Console) liveSession(id string) (liveSession, bool) {
	online := c.cfg.Broker != nil && c.cfg.Broker.Connected(id)
	if !online {
		return liveSession{}, false
	}
	c.liveMu.Lock()
	s := c.live[id]
	c.liveMu.Unlock()
	return s, true
}

func (c *Console) onDirectoryEvent(ev fleet.Event) {
	switch ev.Kind {
	case fleet.EventDeviceChanged:
		c.hub.publish(event{Type: "device", Device: ev.DeviceID, State: string(ev.State), Time: c.opt.Now().UTC()})
	case fleet.EventCertRevoked:
		if ev.DeviceID != "" {
			c.hub.publish(event{Type: "revoked", Device: ev.DeviceID, Serial: ev.Serial, Time: c.opt.Now().UTC()})
		}
	}
}
