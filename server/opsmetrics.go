package server

// Metrics for operations (deploy/: the Grafana dashboard and the alert
// rules watch them): when the process's CA and server certificates expire,
// and how old the broker's revocation view is.

import (
	"crypto/x509"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// registerOpsMetrics registers, on s.prom:
//
//   - fleetgate_certificate_expiry_timestamp_seconds{cert}: the NotAfter of
//     the root CA, the issuing CA and the server certificate this process
//     serves (cert = root_ca, issuing_ca, server), as read at start;
//   - fleetgate_revocation_view_age_seconds: how long ago the directory
//     this process checks certificates against last heard from its source.
//     0 where the registry is in the process (it is the source); with
//     --only broker, the time since the last successful poll of the
//     enrollment service's feed (since the start, before the first);
//   - fleetgate_devices{state, attestation}: devices by state and
//     attestation method, from the directory.
func (s *Server) registerOpsMetrics(p pki, dir *directory.Directory) {
	expiry := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "fleetgate_certificate_expiry_timestamp_seconds",
		Help: "NotAfter (unix seconds) of the CA and server certificates of this process, by cert (root_ca, issuing_ca, server).",
	}, []string{"cert"})
	set := func(label string, c *x509.Certificate) {
		if c != nil {
			expiry.WithLabelValues(label).Set(float64(c.NotAfter.Unix()))
		}
	}
	if root, err := ca.ReadCertFile(s.layout.RootCert()); err == nil {
		set("root_ca", root)
	}
	// The served chain: the server's leaf, then the issuing CA.
	for i, der := range p.serverCert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			continue
		}
		switch {
		case i == 0:
			set("server", c)
		case c.IsCA && !isSelfSigned(c):
			set("issuing_ca", c)
		}
	}
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
	s.prom.MustRegister(expiry, age, &deviceCounts{dir: dir})
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

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}
