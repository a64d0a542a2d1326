package directory

import (
	"sync"

	"github.com/fleetgate/fleetgate/fleet"
)

// Watchers is a list of change listeners. The zero value is ready to use;
// safe for concurrent use.
type Watchers struct {
	mu sync.Mutex
	fn []func(fleet.Event)
}

// Watch registers fn to be called with every change, in order, on the
// goroutine that made the change: fn must not block for long.
func (w *Watchers) Watch(fn func(fleet.Event)) {
	w.mu.Lock()
	w.fn = append(w.fn, fn)
	w.mu.Unlock()
}

// Notify calls every listener with every event.
func (w *Watchers) Notify(evs ...fleet.Event) {
	w.mu.Lock()
	fns := w.fn
	w.mu.Unlock()
	for _, ev := range evs {
		for _, fn := range fns {
			fn(ev)
		}
	}
}
