package enroll

import (
	"net/http"
	"strconv"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// maxFeedWait bounds a long poll of the change feed.
const maxFeedWait = 25 * time.Second // below the API server's WriteTimeout

// handleFeed serves the registry change feed (long poll) to brokers running
// in their own process.
func (s *Server) handleFeed(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	q := r.URL.Query()
	epoch := q.Get("epoch")
	since, _ := strconv.ParseUint(q.Get("since"), 10, 64)
	wait, _ := time.ParseDuration(q.Get("wait"))
	wait = min(max(wait, 0), maxFeedWait)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	reg := s.cfg.Registry
	for {
		evs, version, ok, changed := reg.Changes(epoch, since)
		if !ok {
			writeJSON(w, http.StatusOK, snapshotFeed(reg))
			return
		}
		if len(evs) > 0 || wait == 0 {
			writeJSON(w, http.StatusOK, changesFeed(reg, epoch, version, evs))
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			writeJSON(w, http.StatusOK, api.Feed{Epoch: epoch, Version: version})
			return
		case <-r.Context().Done():
			return
		}
	}
}

func feedCert(serial string, c registry.CertStatus) api.FeedCert {
	return api.FeedCert{Serial: serial, Role: string(c.Identity.Role), Name: c.Identity.Name, NotAfter: c.NotAfter, Revoked: c.Revoked}
}

func snapshotFeed(reg *registry.Registry) api.Feed {
	epoch, version, certs, devices := reg.Snapshot()
	f := api.Feed{Epoch: epoch, Version: version, Snapshot: true,
		Certs: make([]api.FeedCert, 0, len(certs)), Devices: make([]api.FeedDevice, 0, len(devices))}
	for s, c := range certs {
		f.Certs = append(f.Certs, feedCert(s, c))
	}
	for id, d := range devices {
		f.Devices = append(f.Devices, api.FeedDevice{ID: id, Group: d.Group, State: string(d.State), Tags: d.Tags})
	}
	return f
}

func changesFeed(reg *registry.Registry, epoch string, version uint64, evs []registry.Event) api.Feed {
	f := api.Feed{Epoch: epoch, Version: version}
	seenC, seenD := map[string]bool{}, map[string]bool{}
	for _, ev := range evs {
		if ev.Serial != "" && !seenC[ev.Serial] {
			seenC[ev.Serial] = true
			if c, ok := reg.CertStatus(ev.Serial); ok {
				f.Certs = append(f.Certs, feedCert(ev.Serial, c))
			}
		}
		if ev.DeviceID != "" && !seenD[ev.DeviceID] {
			seenD[ev.DeviceID] = true
			if d, ok := reg.DeviceStatus(ev.DeviceID); ok {
				f.Devices = append(f.Devices, api.FeedDevice{ID: ev.DeviceID, Group: d.Group, State: string(d.State), Tags: d.Tags})
			}
		}
	}
	return f
}
