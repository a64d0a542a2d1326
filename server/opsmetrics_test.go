package server_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
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
// The CA expiry gauges are the NotAfter of the root and of every trusted
// issuing CA, the old one too after a rotation.
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
	expiry := func(g *testenv.Gateway, kind string, c *x509.Certificate) error {
		series := `fleetgate_pki_certificate_expiry_timestamp_seconds{kind="` + kind + `",subject="` + c.Subject.CommonName + `"}`
		if v, _ := gauge(t, g, series); int64(v) != c.NotAfter.Unix() {
			return fmt.Errorf("%s: %v, want %d", series, v, c.NotAfter.Unix())
		}
		return nil
	}
	first, err := ca.Load(ecfg.DataDir, ca.Options{NoKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range []*testenv.Gateway{enr, brk} {
		for kind, c := range map[string]*x509.Certificate{"root": first.Root, "issuing": first.Issuing()} {
			if err := expiry(g, kind, c); err != nil {
				t.Error(err)
			}
		}
	}
	// After a rotation both issuing CAs are trusted: both are watched, in
	// the enrollment process and in the broker apart that follows it.
	if _, err := enr.Admin.CARotate(context.Background()); err != nil {
		t.Fatal(err)
	}
	rotated, err := ca.Load(ecfg.DataDir, ca.Options{NoKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range []*testenv.Gateway{enr, brk} {
		testenv.Eventually(t, 20*time.Second, func() error {
			return errors.Join(expiry(g, "issuing", first.Issuing()), expiry(g, "issuing", rotated.Issuing()))
		})
	}

	enr.Stop()
	testenv.Eventually(t, 60*time.Second, func() error {
		if v, _ := gauge(t, brk, "fleetgate_revocation_view_age_seconds"); v < 3 {
			return fmt.Errorf("broker-only after the enrollment service stopped: age %v", v)
		}
		return nil
	})
}
