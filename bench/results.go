package bench

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Metric is one measured quantity of one scenario, every repetition's value
// per broker.
type Metric struct {
	Scenario string               `json:"scenario"`
	Name     string               `json:"metric"`
	Better   string               `json:"better,omitempty"` // "higher", "lower" or "" (informative)
	Values   map[string][]float64 `json:"values"`           // broker -> one value per repetition
}

// Stat is the median and range of a metric's repetitions.
type Stat struct {
	Median, Min, Max float64
	N                int
}

func stat(v []float64) (Stat, bool) {
	if len(v) == 0 {
		return Stat{}, false
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Stat{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}, true
}

// Results of one run.
type Results struct {
	Started  time.Time         `json:"started"`
	Duration string            `json:"duration"`
	Machine  map[string]string `json:"machine"`
	Config   map[string]any    `json:"config"`
	Metrics  []*Metric         `json:"metrics"`
	Notes    []string          `json:"notes,omitempty"`
	Errors   []string          `json:"errors,omitempty"`
}

// Add records one repetition's values.
func (r *Results) Add(scenario, broker string, v Values) {
	names := make([]string, 0, len(v))
	for k := range v {
		names = append(names, k)
	}
	slices.SortFunc(names, func(a, b string) int { return metricOrder(a) - metricOrder(b) })
	for _, name := range names {
		m := r.metric(scenario, name)
		m.Values[broker] = append(m.Values[broker], v[name])
	}
}

// metricOrder puts headline metrics first.
func metricOrder(name string) int {
	for i, p := range []string{"connects/s", "delivered", "enrollments", "RSS KB", "connect all", "revoke→closed p50", "revoke→closed p99", "p50", "p99", "broker CPU µs", "server CPU", "per core", "lost"} {
		if strings.HasPrefix(name, p) {
			return i
		}
	}
	return 100
}

func (r *Results) metric(scenario, name string) *Metric {
	for _, m := range r.Metrics {
		if m.Scenario == scenario && m.Name == name {
			return m
		}
	}
	m := &Metric{Scenario: scenario, Name: name, Better: better(name), Values: map[string][]float64{}}
	r.Metrics = append(r.Metrics, m)
	return m
}

func better(name string) string {
	switch {
	case strings.Contains(name, "/s"):
		return "higher"
	case strings.HasPrefix(name, "broker CPU µs"), strings.HasPrefix(name, "server CPU µs"), strings.HasPrefix(name, "RSS KB"),
		strings.Contains(name, " ms"), strings.HasPrefix(name, "connect all"), strings.HasPrefix(name, "lost"):
		return "lower"
	}
	return ""
}

func fmtNum(x float64) string {
	a := math.Abs(x)
	switch {
	case a == 0:
		return "0"
	case a >= 1000:
		return fmt.Sprintf("%.0f", x)
	case a >= 100:
		return fmt.Sprintf("%.0f", x)
	case a >= 10:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.2f", x)
	}
}

func fmtStat(v []float64) string {
	s, ok := stat(v)
	if !ok {
		return "n/a"
	}
	if s.N == 1 || s.Min == s.Max {
		return fmtNum(s.Median)
	}
	return fmt.Sprintf("%s [%s–%s]", fmtNum(s.Median), fmtNum(s.Min), fmtNum(s.Max))
}

// Ratio is fleetgate's median over mosquitto's, when both exist.
func (m *Metric) Ratio() (float64, bool) {
	f, ok1 := stat(m.Values["fleetgate"])
	q, ok2 := stat(m.Values["mosquitto"])
	if !ok1 || !ok2 || q.Median == 0 {
		return 0, false
	}
	return f.Median / q.Median, true
}

// Table writes the terminal table (tab-aligned) or, with md, Markdown.
func (r *Results) Table(w io.Writer, md bool) {
	if md {
		fmt.Fprintln(w, "| scenario | metric | fleetgate median [min–max] | mosquitto median [min–max] | fleetgate/mosquitto |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	if !md {
		fmt.Fprintln(tw, "scenario\tmetric\tfleetgate median [min–max]\tmosquitto median [min–max]\tfleetgate/mosquitto\t")
	}
	for _, m := range r.Metrics {
		ratio := ""
		if x, ok := m.Ratio(); ok {
			ratio = fmt.Sprintf("%.2f", x)
			if m.Better != "" {
				ratio += " (" + m.Better + " is better)"
			}
		}
		name := m.Name
		if md {
			fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", m.Scenario, name, fmtStat(m.Values["fleetgate"]), fmtStat(m.Values["mosquitto"]), ratio)
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", m.Scenario, name, fmtStat(m.Values["fleetgate"]), fmtStat(m.Values["mosquitto"]), ratio)
		}
	}
	tw.Flush()
}

// WriteJSON writes the results with every repetition's value.
func (r *Results) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// WriteSVG draws the ratios fleetgate/mosquitto of the headline metrics
// (those with a direction) as horizontal bars on a log scale around 1.
func (r *Results) WriteSVG(path string) error {
	var ms []*Metric
	for _, m := range r.Metrics {
		if _, ok := m.Ratio(); ok && m.Better != "" && !strings.HasPrefix(m.Name, "lost") {
			ms = append(ms, m)
		}
	}
	const (
		left, barW, rowH, top = 330, 420, 22, 50
	)
	width := left + barW + 90
	height := top + rowH*len(ms) + 60
	lo, hi := math.Log10(1.0/8), math.Log10(8.0)
	x := func(ratio float64) float64 {
		l := math.Max(lo, math.Min(hi, math.Log10(ratio)))
		return left + (l-lo)/(hi-lo)*barW
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14" font-weight="bold">fleetgate / mosquitto (medians), %s</text>`+"\n", html.EscapeString(r.Started.Format("2006-01-02 15:04")))
	fmt.Fprintf(&b, `<text x="10" y="38" fill="#555">green: fleetgate better; red: worse (log scale; "lower is better" metrics are better below 1)</text>`+"\n")
	for _, t := range []float64{0.125, 0.25, 0.5, 1, 2, 4, 8} {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s"/>`+"\n", x(t), top-4, x(t), top+rowH*len(ms), map[bool]string{true: "#000", false: "#ddd"}[t == 1])
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%g×</text>`+"\n", x(t), top+rowH*len(ms)+16, t)
	}
	for i, m := range ms {
		ratio, _ := m.Ratio()
		y := top + i*rowH
		good := (m.Better == "higher" && ratio >= 1) || (m.Better == "lower" && ratio <= 1)
		color := "#c0392b"
		if good {
			color = "#27ae60"
		}
		x0, x1 := x(1), x(ratio)
		if x1 < x0 {
			x0, x1 = x1, x0
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s — %s (%s better)</text>`+"\n", left-8, y+15, html.EscapeString(m.Scenario), html.EscapeString(m.Name), m.Better)
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", x0, y+4, math.Max(1, x1-x0), rowH-8, color)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%.2f×</text>`+"\n", left+barW+8, y+15, ratio)
	}
	fmt.Fprintf(&b, `<text x="10" y="%d" fill="#555">%s</text>`+"\n", height-12, html.EscapeString("each bar: median of the repetitions; full table and spread in the JSON next to this file"))
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
