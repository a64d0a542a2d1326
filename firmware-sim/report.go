package sim

import (
	"fmt"
	"io"
	"slices"
	"time"
)

// Check is one verified property of the run.
type Check struct {
	Name   string `json:"name"`
	Passed bool   `json:"passed"`
	Detail string `json:"detail,omitempty"`
}

// Report is the outcome of a run.
type Report struct {
	Scenario      string        `json:"scenario"`
	TPM           string        `json:"tpm"`
	Devices       int           `json:"devices"`
	Enrolled      int           `json:"enrolled"`
	Connected     int           `json:"connected"`
	EnrollP50     time.Duration `json:"enroll_p50_ns"`
	EnrollP99     time.Duration `json:"enroll_p99_ns"`
	ConnectP50    time.Duration `json:"connect_p50_ns"`
	ConnectP99    time.Duration `json:"connect_p99_ns"`
	Sent          int64         `json:"messages_sent"`
	Delivered     int64         `json:"messages_delivered"`
	Lost          int64         `json:"messages_lost"`
	MsgsPerSec    float64       `json:"messages_per_second"`
	FirstDelivery time.Duration `json:"first_delivery_ns"`
	CommandRTT    time.Duration `json:"command_rtt_ns"`
	Checks        []Check       `json:"checks"`
	Elapsed       time.Duration `json:"elapsed_ns"`
	Errors        []string      `json:"errors,omitempty"`
	// With --spawn: the gateway's resident memory before the devices
	// connected and with all of them connected, and the difference per
	// connection.
	GatewayRSSBeforeKB int64   `json:"gateway_rss_before_kb,omitempty"`
	GatewayRSSAfterKB  int64   `json:"gateway_rss_after_kb,omitempty"`
	RSSPerConnectionKB float64 `json:"rss_per_connection_kb,omitempty"`
	ConnectsPerSec     float64 `json:"connects_per_second"`
	// Manufacture is the time to make every swtpm (0 without TPMs);
	// EnrollConnect the time until every device enrolled and connected.
	Manufacture   time.Duration `json:"manufacture_ns,omitempty"`
	EnrollConnect time.Duration `json:"enroll_connect_ns"`
}

// OK reports whether every check passed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if !c.Passed {
			return false
		}
	}
	return len(r.Checks) > 0
}

func (r *Report) check(name string, ok bool, f string, a ...any) {
	r.Checks = append(r.Checks, Check{Name: name, Passed: ok, Detail: fmt.Sprintf(f, a...)})
}

func head(s []string) []string {
	slices.Sort(s)
	if len(s) > 5 {
		return s[:5]
	}
	return s
}

func percentiles(ds []time.Duration) (p50, p99 time.Duration) {
	s := slices.DeleteFunc(slices.Clone(ds), func(d time.Duration) bool { return d == 0 })
	if len(s) == 0 {
		return 0, 0
	}
	slices.Sort(s)
	return s[len(s)*50/100], s[min(len(s)-1, len(s)*99/100)]
}

// WriteTable prints the report for humans.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "\nfleetsim report: scenario %s (%s)\n", r.Scenario, r.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(w, "  devices            %d enrolled, %d connected of %d (keys: %s)\n", r.Enrolled, r.Connected, r.Devices, r.TPM)
	fmt.Fprintf(w, "  enrollment         p50 %s  p99 %s\n", r.EnrollP50.Round(time.Microsecond), r.EnrollP99.Round(time.Microsecond))
	fmt.Fprintf(w, "  connect (mTLS)     p50 %s  p99 %s\n", r.ConnectP50.Round(time.Microsecond), r.ConnectP99.Round(time.Microsecond))
	if r.Manufacture > 0 {
		fmt.Fprintf(w, "  manufacture        %d swtpm in %s (%.0f/s)\n", r.Devices, r.Manufacture.Round(time.Millisecond), float64(r.Devices)/r.Manufacture.Seconds())
	}
	fmt.Fprintf(w, "  enroll + connect   %d devices in %s (%.0f/s, %d at a time)\n", r.Connected, r.EnrollConnect.Round(time.Millisecond), r.ConnectsPerSec, setupParallel)
	if r.GatewayRSSAfterKB > 0 {
		fmt.Fprintf(w, "  gateway memory     %d KB -> %d KB with %d connections: %.1f KB per connection\n", r.GatewayRSSBeforeKB, r.GatewayRSSAfterKB, r.Connected, r.RSSPerConnectionKB)
	}
	fmt.Fprintf(w, "  telemetry (QoS 1)  %d acknowledged, %d delivered, %d lost; %.0f msg/s\n", r.Sent, r.Delivered, r.Lost, r.MsgsPerSec)
	fmt.Fprintf(w, "  first delivery     %s after start\n", r.FirstDelivery.Round(time.Millisecond))
	fmt.Fprintln(w, "  checks:")
	for _, c := range r.Checks {
		mark := "PASS"
		if !c.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "    [%s] %s (%s)\n", mark, c.Name, c.Detail)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
}
