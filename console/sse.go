package console

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Live updates: server-sent events on GET /events.
//
// Every stream has a bounded queue; publish never waits: a stream whose
// queue is full is dropped (the browser's EventSource reconnects and the
// page reloads its live part). Streams are bounded in all and per session,
// get a comment every Heartbeat when idle, have a write deadline per
// event, and end when their session ends (logout, expiry).

// event is one live update, sent as JSON in an SSE data line.
type event struct {
	Type   string    `json:"type"` // connected, disconnected, device, revoked, refused
	Device string    `json:"device,omitempty"`
	State  string    `json:"state,omitempty"`
	Serial string    `json:"serial,omitempty"`
	Remote string    `json:"remote,omitempty"`
	Reason string    `json:"reason,omitempty"`
	Count  int       `json:"count,omitempty"`
	Time   time.Time `json:"time"`
}

type stream struct {
	ch      chan []byte
	dropped chan struct{} // closed when the hub drops the stream
	session string
}

type hub struct {
	opt        Options
	mu         sync.Mutex
	streams    map[*stream]struct{}
	perSession map[string]int
	dropped    int // streams dropped as slow (tests, docs)
}

var (
	errTooManyStreams        = errors.New("too many live streams")
	errTooManySessionStreams = errors.New("too many live streams for this session; close some tabs")
)

func newHub(o Options) *hub {
	return &hub{opt: o, streams: map[*stream]struct{}{}, perSession: map[string]int{}}
}

func (h *hub) add(session string) (*stream, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.streams) >= h.opt.MaxStreams {
		return nil, errTooManyStreams
	}
	if h.perSession[session] >= h.opt.MaxStreamsPerSession {
		return nil, errTooManySessionStreams
	}
	s := &stream{ch: make(chan []byte, h.opt.StreamBuffer), dropped: make(chan struct{}), session: session}
	h.streams[s] = struct{}{}
	h.perSession[session]++
	return s, nil
}

func (h *hub) remove(s *stream) {
	h.mu.Lock()
	h.removeLocked(s)
	h.mu.Unlock()
}

func (h *hub) removeLocked(s *stream) {
	if _, ok := h.streams[s]; !ok {
		return
	}
	delete(h.streams, s)
	if h.perSession[s.session]--; h.perSession[s.session] <= 0 {
		delete(h.perSession, s.session)
	}
}

// publish queues ev on every stream; full streams are dropped.
func (h *hub) publish(ev event) {
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.streams {
		select {
		case s.ch <- b:
		default:
			h.removeLocked(s)
			h.dropped++
			close(s.dropped)
		}
	}
}

// counts returns the live streams and those dropped as slow.
func (h *hub) counts() (live, dropped int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.streams), h.dropped
}

// serveEvents streams events to one signed-in browser until it goes, its
// session ends or it is dropped.
func (c *Console) serveEvents(w http.ResponseWriter, r *http.Request, key string, sess *session) {
	st, err := c.hub.add(key)
	if err != nil {
		w.Header().Set("Retry-After", "10")
		http.Error(w, err.Error(), http.StatusTooManyRequests)
		return
	}
	defer c.hub.remove(st)
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	write := func(b []byte) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if _, err := w.Write(b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !write([]byte("retry: 3000\n: live\n\n")) {
		return
	}
	expiry := time.NewTimer(sess.expires.Sub(c.opt.Now()))
	defer expiry.Stop()
	beat := time.NewTicker(c.opt.Heartbeat)
	defer beat.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-sess.done:
			write([]byte("event: end\ndata: {}\n\n"))
			return
		case <-expiry.C:
			write([]byte("event: end\ndata: {}\n\n"))
			return
		case <-st.dropped:
			return
		case <-beat.C:
			// A session whose operator certificate was revoked ends here
			// too, not only at its next page.
			if _, _, err := c.auth.byKey(key); err != nil {
				write([]byte("event: end\ndata: {}\n\n"))
				return
			}
			if !write([]byte(": heartbeat\n\n")) {
				return
			}
		case b := <-st.ch:
			if !write(fmt.Appendf(nil, "data: %s\n\n", b)) {
				return
			}
		}
	}
}
