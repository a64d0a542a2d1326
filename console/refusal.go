package console

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Refused requests (a sign-in link that is not valid, no session, a
// cross-origin POST) are logged with a reason and the source, at most a
// few lines per source and reason a minute and a bounded number in all;
// the rest are summarised (a flood must not become a log flood).

func newRefusalLimiter(log *slog.Logger) *logguard.Limiter {
	return logguard.New(logguard.Options{Burst: 5, Window: time.Minute, MaxKeys: 4096, Global: 100, Summaries: 100,
		Summary: logguard.LogSummary(log, "console refusals not logged one by one")})
}

// refused logs a refusal of r (msg, reason and attrs) if the source's
// budget allows.
func (c *Console) refused(r *http.Request, level slog.Level, msg, reason string, attrs ...any) {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	if !c.refusals.AllowCode(host, reason) {
		return
	}
	args := append([]any{"reason", reason, "path", logguard.Clip(r.URL.Path, 0), "remote", r.RemoteAddr}, attrs...)
	c.log.Log(context.Background(), level, msg, args...)
}
