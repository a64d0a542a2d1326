package replica

import "time"

// LastContact is when the replica last heard from the feed (a successful
// poll); zero before the first one. The server exports its age as
// fleetgate_revocation_view_age_seconds, which the stale-revocation-view
// alert watches (deploy/prometheus/fleetgate-alerts.yml).
func (r *Replica) LastContact() time.Time {
	n := r.lastOK.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}
