package enroll

import (
	"net/http"
	"strconv"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
)

// maxFeedWait bounds a long poll of the change feed.
const maxFeedWait = 25 * time.Second // below the API server's WriteTimeout

// handleFeed serves the registry's change feed (long poll) to brokers
// running in their own process. The answers are the directory's
// (directory.FeedSince); this is the HTTP long poll around them.
func (s *Server) handleFeed(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	q := r.URL.Query()
	epoch := q.Get("epoch")
	since, _ := strconv.ParseUint(q.Get("since"), 10, 64)
	wait, _ := time.ParseDuration(q.Get("wait"))
	wait = min(max(wait, 0), maxFeedWait)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	dir := s.cfg.Registry.Directory()
	for {
		f, ready, changed := dir.FeedSince(epoch, since)
		if ready || wait == 0 {
			writeJSON(w, http.StatusOK, f)
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			writeJSON(w, http.StatusOK, api.Feed{Epoch: epoch, Version: f.Version})
			return
		case <-r.Context().Done():
			return
		}
	}
}
