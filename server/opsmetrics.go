package server

// Metrics for operations (deploy/: the Grafana dashboard and the alert
// rules watch them): how old the broker's revocation view is, and the
// devices by state and attestation method. When the CA certificates
// expire is fleetgate_pki_certificate_expiry_timestamp_seconds (ocsp.go),
// for every trusted issuing CA.

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/directory"
)

// registerOpsMetrics registers, on s.prom:
//
//   - fleetgate_revocation_view_age_seconds: how long ago the directory
//     this process checks certificates against last heard from its source.
//     0 where the registry is in the process (it is the source); with
//     --only broker, the time since the last successful poll of the
//     enrollment service's feed (since the start, before the first);
//   - fleetgate_devices{state, attestation}: devices by state and
//     attestation method, from the directory.
func (s *Server) registerOpsMetrics(dir *directory.Directory) {
	started := time.Now()
	age := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "fleetgate_revocation_view_age_seconds",
		Help: "Seconds since the directory (the revocation view the broker checks) last heard from its source; 0 where the registry is in this process.",
	}, func() float64 {
		if s.rep == nil {
			return 0
		}
		last := s.rep.LastContact()
		if last.IsZero() {
			last = started
		}
		return time.Since(last).Seconds()
	})
	s.prom.MustRegister(age, &deviceCounts{dir: dir})
}

// deviceCounts is fleetgate_devices{state, attestation}, counted from the
// directory at each scrape.
type deviceCounts struct{ dir *directory.Directory }

var devicesDesc = prometheus.NewDesc("fleetgate_devices", "Devices in the registry by state (registered, active, suspended, revoked) and attestation method (tpm, token; none before enrollment).",
	[]string{"state", "attestation"}, nil)

func (c *deviceCounts) Describe(ch chan<- *prometheus.Desc) { ch <- devicesDesc }

func (c *deviceCounts) Collect(ch chan<- prometheus.Metric) {
	if c.dir == nil {
		return
	}
	for _, n := range c.dir.DeviceCounts() {
		method := n.Method
		if method == "" {
			method = "none"
		}
		ch <- prometheus.MustNewConstMetric(devicesDesc, prometheus.GaugeValue, float64(n.N), string(n.State), method)
	}
}
