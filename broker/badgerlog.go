package broker

import (
	"context"
	"log/slog"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/internal/logguard"
)

// SetOpts gives mochi's badger hook, and through it badger (the hook makes
// itself badger's logger), a quiet logger: badger's info and debug output
// (its level and table listing at every close, compaction chatter, cache
// metrics) is not the operator's business; its warnings and errors are
// logged, each message bounded, without the raw argument dump ("v") the
// hook adds.
func (h *storageHook) SetOpts(l *slog.Logger, opts *mqtt.HookOptions) {
	h.Hook.SetOpts(slog.New(quietHandler{l.Handler()}), opts)
}

// quietHandler passes records at warn level and above, message bounded,
// without attributes named "v".
type quietHandler struct{ h slog.Handler }

// badgerMsgMax bounds a badger message in the log.
const badgerMsgMax = 300

func (q quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn && q.h.Enabled(ctx, l)
}

func (q quietHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, logguard.Bound(r.Message, badgerMsgMax), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != "v" {
			out.AddAttrs(a)
		}
		return true
	})
	return q.h.Handle(ctx, out)
}

func (q quietHandler) WithAttrs(as []slog.Attr) slog.Handler { return quietHandler{q.h.WithAttrs(as)} }
func (q quietHandler) WithGroup(name string) slog.Handler    { return quietHandler{q.h.WithGroup(name)} }
