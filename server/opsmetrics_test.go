package server_test

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func gauge(t *testing.T, g *testenv.Gateway, series string) (float64, bool) {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(g.Metrics(t))
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

// The revocation view's age: 0 where the registry is; in a broker-only
// process, small while it follows the feed and growing once the
// enrollment service is gone (what FleetgateRevocationViewStale watches).
// The CA certificate expiry gauges are the files' NotAfter.
func TestOpsMetrics(t *testing.T) {
	ecfg := testenv.Config(t, testenv.Options{})
	ecfg.Only = "enroll"
	enr := testenv.StartConfig(t, ecfg)
	bcfg := testenv.Config(t, testenv.Options{DataDir: ecfg.DataDir})
	bcfg.Only, bcfg.EnrollURL = "broker", enr.URL()
	brk := testenv.StartConfig(t, bcfg)

	if v, ok := gauge(t, enr, "fleetgate_revocation_view_age_seconds"); !ok || v != 0 {
		t.Fatalf("enrollment process: age %v %v", v, ok)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		if v, ok := gauge(t, brk, "fleetgate_revocation_view_age_seconds"); !ok || v >= 45 {
			return fmt.Errorf("broker-only: age %v %v", v, ok)
		}
		return nil
	})
	for file, label := range map[string]string{ca.RootCertFile: "root", ca.IssuingCertFile: "issuing"} {
		c, err := ca.ReadCertFile(filepath.Join(ecfg.DataDir, file))
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range []*testenv.Gateway{enr, brk} {
			if v, _ := gauge(t, g, `fleetgate_ca_certificate_expiry_timestamp_seconds{ca="`+label+`"}`); int64(v) != c.NotAfter.Unix() {
				t.Errorf("%s: %v, want %d", label, v, c.NotAfter.Unix())
			}
		}
	}

	enr.Stop()
	testenv.Eventually(t, 60*time.Second, func() error {
		if v, _ := gauge(t, brk, "fleetgate_revocation_view_age_seconds"); v < 3 {
			return fmt.Errorf("broker-only after the enrollment service stopped: age %v", v)
		}
		return nil
	})
}
