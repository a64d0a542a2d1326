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
		strings.Contains(name, " ms"), strings.HasPrefix(name, "connect all"), strings.HasPrefix(name, "lost"), strings.HasSuffix(name, ", lost"):
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

// Peers are the brokers of a metric other than fleetgate, in a stable order.
func (m *Metric) Peers() []string {
	var ps []string
	for name := range m.Values {
		if name != "fleetgate" {
			ps = append(ps, name)
		}
	}
	slices.Sort(ps)
	return ps
}

// BestPeer is the peer with the best median of a metric that has a
// direction (highest where higher is better, lowest where lower is), or,
// for an informative metric, mosquitto's when it has one.
func (m *Metric) BestPeer() (string, bool) {
	best, bestV := "", 0.0
	for _, p := range m.Peers() {
		s, ok := stat(m.Values[p])
		if !ok {
			continue
		}
		switch {
		case best == "",
			m.Better == "higher" && s.Median > bestV,
			m.Better == "lower" && s.Median < bestV:
			best, bestV = p, s.Median
		}
	}
	if m.Better == "" {
		if _, ok := stat(m.Values["mosquitto"]); ok {
			return "mosquitto", true
		}
	}
	return best, best != ""
}

// Ratio is fleetgate's median over the best peer's, when both exist, and
// which peer that is.
func (m *Metric) Ratio() (float64, string, bool) {
	f, ok1 := stat(m.Values["fleetgate"])
	p, ok := m.BestPeer()
	if !ok || !ok1 {
		return 0, "", false
	}
	q, _ := stat(m.Values[p])
	if q.Median == 0 {
		return 0, p, false
	}
	return f.Median / q.Median, p, true
}

// Brokers are the brokers of the run's single-node scenarios, fleetgate
// first, then the peers in name order (ClusterTable has the clusters').
func (r *Results) Brokers() []string {
	seen := map[string]bool{}
	for _, m := range r.Metrics {
		if isCluster(m.Scenario) {
			continue
		}
		for name := range m.Values {
			seen[name] = true
		}
	}
	out := []string{"fleetgate"}
	delete(seen, "fleetgate")
	var peers []string
	for name := range seen {
		peers = append(peers, name)
	}
	slices.Sort(peers)
	return append(out, peers...)
}

// table writes rows under head, tab-aligned or, with md, in Markdown.
func table(w io.Writer, md bool, head []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	row := func(cells []string) {
		if md {
			fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
		} else {
			fmt.Fprintf(tw, "%s\t\n", strings.Join(cells, "\t"))
		}
	}
	row(head)
	if md {
		row(slices.Repeat([]string{"---"}, len(head)))
	}
	for _, r := range rows {
		row(r)
	}
	tw.Flush()
}

// cells are a metric's median [min–max] per broker ("" where none).
func (m *Metric) cells(brokers []string) []string {
	cells := []string{m.Scenario, m.Name}
	for _, b := range brokers {
		if len(m.Values[b]) == 0 {
			cells = append(cells, "")
			continue
		}
		cells = append(cells, fmtStat(m.Values[b]))
	}
	return cells
}

// Table writes the terminal table (tab-aligned) or, with md, Markdown: one
// column per broker and fleetgate's ratio to the best peer of each metric.
// The cluster scenarios are ClusterTable's.
func (r *Results) Table(w io.Writer, md bool) {
	brokers := r.Brokers()
	head := []string{"scenario", "metric"}
	for _, b := range brokers {
		head = append(head, b+" median [min–max]")
	}
	head = append(head, "fleetgate / best peer")
	var rows [][]string
	for _, m := range r.Metrics {
		if isCluster(m.Scenario) {
			continue
		}
		ratio := ""
		if x, peer, ok := m.Ratio(); ok {
			ratio = fmt.Sprintf("%.2f vs %s", x, peer)
			if m.Better != "" {
				ratio += " (" + m.Better + " is better)"
			}
		}
		rows = append(rows, append(m.cells(brokers), ratio))
	}
	if len(rows) > 0 {
		table(w, md, head, rows)
	}
}

// WriteJSON writes the results with every repetition's value.
func (r *Results) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// WriteSVG draws the ratios fleetgate / best peer of the headline metrics
// (those with a direction) as horizontal bars on a log scale around 1.
func (r *Results) WriteSVG(path string) error {
	var ms []*Metric
	for _, m := range r.Metrics {
		if _, _, ok := m.Ratio(); ok && m.Better != "" && !strings.HasPrefix(m.Name, "lost") && !isCluster(m.Scenario) {
			ms = append(ms, m)
		}
	}
	const (
		left, barW, rowH, top = 460, 420, 22, 50
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
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="14" font-weight="bold">fleetgate / best peer (medians), %s</text>`+"\n", html.EscapeString(r.Started.Format("2006-01-02 15:04")))
	fmt.Fprintf(&b, `<text x="10" y="38" fill="#555">green: fleetgate better; red: worse (log scale; "lower is better" metrics are better below 1)</text>`+"\n")
	for _, t := range []float64{0.125, 0.25, 0.5, 1, 2, 4, 8} {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s"/>`+"\n", x(t), top-4, x(t), top+rowH*len(ms), map[bool]string{true: "#000", false: "#ddd"}[t == 1])
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%g×</text>`+"\n", x(t), top+rowH*len(ms)+16, t)
	}
	for i, m := range ms {
		ratio, peer, _ := m.Ratio()
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
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s — %s (%s better) vs %s</text>`+"\n", left-8, y+15, html.EscapeString(m.Scenario), html.EscapeString(m.Name), m.Better, html.EscapeString(peer))
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", x0, y+4, math.Max(1, x1-x0), rowH-8, color)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%.2f×</text>`+"\n", left+barW+8, y+15, ratio)
	}
	fmt.Fprintf(&b, `<text x="10" y="%d" fill="#555">%s</text>`+"\n", height-12, html.EscapeString("each bar: median of the repetitions; full table and spread in the JSON next to this file"))
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
