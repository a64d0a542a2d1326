package console

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

//go:embed web
var webFS embed.FS

// csp allows nothing inline: scripts, styles and connections from the
// console itself only.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
	"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

// pageSize is the devices per page of the device list.
const pageSize = 50

// auditScan bounds the records one audit page reads when it filters on
// actor, action or outcome.
const auditScan = 2000

type pages struct {
	t      *template.Template
	static http.Handler
}

func newPages(c *Console) (*pages, error) {
	funcs := template.FuncMap{
		"ts": func(t time.Time) string {
			if t.IsZero() {
				return "—"
			}
			return t.UTC().Format("2006-01-02 15:04:05Z")
		},
		"until": func(t time.Time) string {
			if t.IsZero() {
				return ""
			}
			d := t.Sub(c.opt.Now())
			if d < 0 {
				return "expired"
			}
			if d < 48*time.Hour {
				return "in " + d.Round(time.Minute).String()
			}
			return fmt.Sprintf("in %d days", int(d.Hours()/24))
		},
		"rate":  func(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) },
		"split": strings.Fields,
		"title": func(s string) string {
			if s == "" {
				return s
			}
			return strings.ToUpper(s[:1]) + s[1:]
		},
	}
	t, err := template.New("").Funcs(funcs).ParseFS(webFS, "web/*.html")
	if err != nil {
		return nil, err
	}
	sub, err := fs.Sub(webFS, "web/static")
	if err != nil {
		return nil, err
	}
	return &pages{t: t, static: http.StripPrefix("/static/", http.FileServerFS(sub))}, nil
}

// req is a signed-in request.
type req struct {
	key  string
	sess *session
	role Role
}

// page is what every page template gets.
type page struct {
	Title    string
	Nav      string
	Operator string
	Role     Role
	ReadOnly bool
	CSRF     string
	// LiveFor is the device whose events refresh the page ("*": any).
	LiveFor string
	Data    any
}

func (c *Console) routes() *http.ServeMux {
	m := http.NewServeMux()
	m.HandleFunc("GET /login", c.handleLogin)
	m.Handle("GET /static/", c.pages.static)
	m.HandleFunc("GET /{$}", c.signedIn(c.handleOverview))
	m.HandleFunc("GET /devices", c.signedIn(c.handleDevices))
	m.HandleFunc("GET /devices/{id}", c.signedIn(c.handleDevice))
	m.HandleFunc("POST /devices/{id}/{action}", c.signedIn(c.handleAction))
	m.HandleFunc("GET /audit", c.signedIn(c.handleAudit))
	m.HandleFunc("GET /policy", c.signedIn(c.handlePolicy))
	m.HandleFunc("GET /events", c.signedIn(func(w http.ResponseWriter, r *http.Request, q req) { c.serveEvents(w, r, q.key, q.sess) }))
	m.HandleFunc("POST /logout", c.signedIn(c.handleLogout))
	return m
}

// ServeHTTP serves the console with its security headers.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin") // "no-referrer" would make form POSTs send Origin: null
	h.Set("X-Frame-Options", "DENY")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Strict-Transport-Security", "max-age=31536000")
	if !strings.HasPrefix(r.URL.Path, "/static/") {
		h.Set("Cache-Control", "no-store")
	} else {
		h.Set("Cache-Control", "private, max-age=300")
	}
	// Pages get 30 s to be written; the event stream sets its own
	// deadline per event.
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(30 * time.Second))
	c.mux.ServeHTTP(w, r)
}

// signedIn wraps a handler for signed-in operators: the session cookie,
// the operator's role read now, and for a POST the Origin and CSRF token.
func (c *Console) signedIn(h func(http.ResponseWriter, *http.Request, req)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key, sess, err := c.auth.session(r)
		if err != nil {
			c.signInPage(w, http.StatusUnauthorized, "")
			return
		}
		role, err := c.opt.Role(sess.op)
		if err != nil {
			c.auth.end(key)
			c.signInPage(w, http.StatusUnauthorized, "Your operator account is no longer valid: "+err.Error())
			return
		}
		if r.Method == http.MethodPost {
			r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
			if err := c.auth.checkCSRF(r, sess); err != nil {
				c.audit(sess.op, "console."+r.URL.Path, "", registry.OutcomeDenied, err.Error(), r.RemoteAddr)
				http.Error(w, err.Error(), http.StatusForbidden)
				return
			}
		}
		h(w, r, req{key: key, sess: sess, role: role})
	}
}

func (c *Console) audit(op identity.Identity, action, device, outcome, reason, remote string) {
	c.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: logguard.Bound(action, 128), DeviceID: device,
		Outcome: outcome, Reason: logguard.Bound(reason, 512), Remote: remote})
}

func (c *Console) signInPage(w http.ResponseWriter, status int, msg string) {
	c.render(w, status, "signin", page{Title: "Sign in", Data: msg})
}

func (c *Console) render(w http.ResponseWriter, status int, name string, p page) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	if err := c.pages.t.ExecuteTemplate(w, name, p); err != nil {
		c.log.Warn("console template", "page", name, "err", err)
	}
}

func (c *Console) newPage(q req, title, nav string, data any) page {
	return page{Title: title, Nav: nav, Operator: q.sess.op.Name, Role: q.role, ReadOnly: q.role != RoleAdmin,
		CSRF: q.sess.csrf, LiveFor: "*", Data: data}
}

func (c *Console) handleLogin(w http.ResponseWriter, r *http.Request) {
	value, sess, err := c.auth.redeem(r.URL.Query().Get("t"))
	if err != nil {
		c.signInPage(w, http.StatusUnauthorized, err.Error())
		return
	}
	c.audit(sess.op, "console.login", "", registry.OutcomeOK, "", r.RemoteAddr)
	setSessionCookie(w, value, c.opt.SessionTTL)
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

func (c *Console) handleLogout(w http.ResponseWriter, r *http.Request, q req) {
	c.auth.end(q.key)
	c.audit(q.sess.op, "console.logout", "", registry.OutcomeOK, "", r.RemoteAddr)
	clearSessionCookie(w)
	c.signInPage(w, http.StatusOK, "You are signed out.")
}

// ---- overview ----

type count struct {
	Name string
	N    int
}

type overviewData struct {
	Devices        int
	ByState        []count
	ByMethod       []count
	Online         int
	Stats          overviewStats
	Bars           []bar
	Expiring       []fleet.Device
	Expiring7d     int
	Expiring30d    int
	Streams        int
	DroppedStreams int
}

// bar is one bar of the refusals chart (an SVG without style).
type bar struct {
	X, Y, H int
	N       int
}

func (c *Console) handleOverview(w http.ResponseWriter, r *http.Request, q req) {
	ds, err := c.cfg.Registry.Devices()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	d := overviewData{Devices: len(ds)}
	states, methods := map[string]int{}, map[string]int{}
	now := c.opt.Now()
	for _, dev := range ds {
		states[string(dev.State)]++
		m := dev.AttestationMethod
		if m == "" {
			m = "none"
		}
		methods[m]++
		if c.cfg.Broker != nil && c.cfg.Broker.Connected(dev.ID) {
			d.Online++
		}
		if dev.State == fleet.StateActive && !dev.NotAfter.IsZero() && dev.NotAfter.After(now) && dev.NotAfter.Before(now.Add(30*24*time.Hour)) {
			d.Expiring = append(d.Expiring, dev)
			if dev.NotAfter.Before(now.Add(7 * 24 * time.Hour)) {
				d.Expiring7d++
			}
		}
	}
	d.Expiring30d = len(d.Expiring)
	sort.Slice(d.Expiring, func(i, j int) bool { return d.Expiring[i].NotAfter.Before(d.Expiring[j].NotAfter) })
	if len(d.Expiring) > 20 {
		d.Expiring = d.Expiring[:20]
	}
	d.ByState, d.ByMethod = counts(states), counts(methods)
	d.Stats = c.stats.overview()
	maxN := 1
	for _, n := range d.Stats.RefusalsPerStep {
		maxN = max(maxN, n)
	}
	for i, n := range d.Stats.RefusalsPerStep {
		h := n * 60 / maxN
		d.Bars = append(d.Bars, bar{X: i * 5, Y: 60 - h, H: h, N: n})
	}
	d.Streams, d.DroppedStreams = c.hub.counts()
	c.render(w, http.StatusOK, "overview", c.newPage(q, "Overview", "overview", d))
}

func counts(m map[string]int) []count {
	out := make([]count, 0, len(m))
	for k, v := range m {
		out = append(out, count{k, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ---- devices ----

type deviceRow struct {
	fleet.Device
	Online bool
}

type devicesData struct {
	Q, Group, State, Method, Online string
	Groups                          []string
	Rows                            []deviceRow
	Total, Page, Pages              int
	Prev, Next                      string
}

func (c *Console) handleDevices(w http.ResponseWriter, r *http.Request, q req) {
	v := r.URL.Query()
	d := devicesData{Q: strings.TrimSpace(v.Get("q")), Group: v.Get("group"), State: v.Get("state"), Method: v.Get("method"), Online: v.Get("online")}
	d.Page, _ = strconv.Atoi(v.Get("page"))
	d.Page = max(d.Page, 1)
	ds, err := c.cfg.Registry.Devices()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	groups := map[string]int{}
	var rows []deviceRow
	for _, dev := range ds {
		groups[dev.Group]++
		online := c.cfg.Broker != nil && c.cfg.Broker.Connected(dev.ID)
		switch {
		case d.Q != "" && !strings.Contains(dev.ID, strings.ToLower(d.Q)) && !tagsMatch(dev.Tags, d.Q):
		case d.Group != "" && dev.Group != d.Group:
		case d.State != "" && string(dev.State) != d.State:
		case d.Method != "" && dev.AttestationMethod != d.Method:
		case d.Online == "yes" && !online, d.Online == "no" && online:
		default:
			rows = append(rows, deviceRow{dev, online})
		}
	}
	for g := range groups {
		d.Groups = append(d.Groups, g)
	}
	sort.Strings(d.Groups)
	sort.Slice(rows, func(i, j int) bool { return rows[i].ID < rows[j].ID })
	d.Total = len(rows)
	d.Pages = max(1, (d.Total+pageSize-1)/pageSize)
	d.Page = min(d.Page, d.Pages)
	lo := (d.Page - 1) * pageSize
	d.Rows = rows[lo:min(lo+pageSize, len(rows))]
	link := func(p int) string {
		u := url.Values{}
		for k, val := range map[string]string{"q": d.Q, "group": d.Group, "state": d.State, "method": d.Method, "online": d.Online} {
			if val != "" {
				u.Set(k, val)
			}
		}
		u.Set("page", strconv.Itoa(p))
		return "/devices?" + u.Encode()
	}
	if d.Page > 1 {
		d.Prev = link(d.Page - 1)
	}
	if d.Page < d.Pages {
		d.Next = link(d.Page + 1)
	}
	c.render(w, http.StatusOK, "devices", c.newPage(q, "Devices", "devices", d))
}

func tagsMatch(tags map[string]string, q string) bool {
	for k, v := range tags {
		if strings.Contains(k+"="+v, q) {
			return true
		}
	}
	return false
}

type certRow struct {
	Serial    string
	NotBefore time.Time
	NotAfter  time.Time
	Revoked   bool
	Current   bool
}

type deviceData struct {
	Device  fleet.Device
	Tags    []count
	Certs   []certRow
	Online  bool
	Session liveSession
	Audit   []registry.AuditRecord
	Flash   string
}

func (c *Console) handleDevice(w http.ResponseWriter, r *http.Request, q req) {
	id := r.PathValue("id")
	if identity.ValidateName(id) != nil {
		http.Error(w, "no such device", http.StatusNotFound)
		return
	}
	dev, err := c.cfg.Registry.Device(id)
	if err != nil {
		c.render(w, http.StatusNotFound, "notfound", c.newPage(q, "Not found", "devices", id))
		return
	}
	d := deviceData{Device: *dev}
	for k, v := range dev.Tags {
		d.Tags = append(d.Tags, count{k + "=" + v, 0})
	}
	sort.Slice(d.Tags, func(i, j int) bool { return d.Tags[i].Name < d.Tags[j].Name })
	d.Session, d.Online = c.liveSession(id)
	d.Audit, _, _ = c.cfg.Registry.AuditPage(registry.AuditQuery{DeviceID: id, Limit: 25})
	// Certificates: the current one and those its audit trail names.
	seen := map[string]bool{}
	addCert := func(serial string) {
		if serial == "" || seen[serial] || len(d.Certs) >= 10 {
			return
		}
		seen[serial] = true
		if cert, err := c.cfg.Registry.Certificate(serial); err == nil && cert.Name == id {
			d.Certs = append(d.Certs, certRow{Serial: serial, NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, Revoked: cert.Revoked, Current: serial == dev.CurrentSerial})
		}
	}
	addCert(dev.CurrentSerial)
	for _, a := range d.Audit {
		for s := range strings.SplitSeq(a.Serial, ",") {
			addCert(s)
		}
	}
	d.Flash = r.URL.Query().Get("done")
	p := c.newPage(q, "Device "+id, "devices", d)
	p.LiveFor = id
	c.render(w, http.StatusOK, "device", p)
}

// handleAction revokes, suspends or resumes a device through the operator
// API's operation. Answers JSON to the page's script (X-CSRF-Token
// header), else redirects back to the device page.
func (c *Console) handleAction(w http.ResponseWriter, r *http.Request, q req) {
	id, action := r.PathValue("id"), r.PathValue("action")
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	fromScript := r.Header.Get("X-CSRF-Token") != ""
	fail := func(status int, msg string) {
		if fromScript {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
			return
		}
		http.Error(w, msg, status)
	}
	if q.role != RoleAdmin {
		c.audit(q.sess.op, "device."+logguard.Bound(action, 16), id, registry.OutcomeDenied, "console: operator is read-only", r.RemoteAddr)
		fail(http.StatusForbidden, "your role is read-only: you cannot "+action+" devices")
		return
	}
	if reason == "" {
		fail(http.StatusBadRequest, "give a reason: it is kept in the audit log")
		return
	}
	if len(reason) > 512 {
		fail(http.StatusBadRequest, "the reason is longer than 512 characters")
		return
	}
	res, err := c.cfg.Operations.DeviceAction(q.sess.op, id, action, "console: "+reason)
	if err != nil {
		var e *enroll.Error
		if errors.As(err, &e) {
			fail(e.Status, e.Msg)
		} else {
			fail(http.StatusInternalServerError, err.Error())
		}
		return
	}
	if fromScript {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(res)
		return
	}
	http.Redirect(w, r, "/devices/"+url.PathEscape(id)+"?done="+url.QueryEscape(action), http.StatusSeeOther)
}

// ---- audit ----

type auditData struct {
	Device, Actor, Action, Outcome string
	Records                        []registry.AuditRecord
	Next                           string
	Scanned                        int
	Error                          string
}

func (c *Console) handleAudit(w http.ResponseWriter, r *http.Request, q req) {
	v := r.URL.Query()
	d := auditData{Device: strings.TrimSpace(v.Get("device")), Actor: strings.TrimSpace(v.Get("actor")), Action: strings.TrimSpace(v.Get("action")), Outcome: v.Get("outcome")}
	cursor := v.Get("cursor")
	filtered := d.Actor != "" || d.Action != "" || d.Outcome != ""
	const want = 50
	for d.Scanned < auditScan && len(d.Records) < want {
		recs, next, err := c.cfg.Registry.AuditPage(registry.AuditQuery{DeviceID: d.Device, Limit: 200, Cursor: cursor})
		if err != nil {
			d.Error = err.Error()
			break
		}
		for i, a := range recs {
			if len(d.Records) == want {
				next = strconv.FormatUint(recs[i-1].Seq, 10)
				break
			}
			if (d.Actor == "" || strings.Contains(a.Actor, d.Actor)) && (d.Action == "" || strings.Contains(a.Action, d.Action)) && (d.Outcome == "" || a.Outcome == d.Outcome) {
				d.Records = append(d.Records, a)
			}
		}
		d.Scanned += len(recs)
		cursor = next
		if next == "" || !filtered && len(d.Records) >= want {
			break
		}
	}
	if cursor != "" {
		u := url.Values{}
		for k, val := range map[string]string{"device": d.Device, "actor": d.Actor, "action": d.Action, "outcome": d.Outcome, "cursor": cursor} {
			if val != "" {
				u.Set(k, val)
			}
		}
		d.Next = "/audit?" + u.Encode()
	}
	p := c.newPage(q, "Audit log", "audit", d)
	if v.Get("cursor") != "" {
		p.LiveFor = "" // an older page does not change
	}
	c.render(w, http.StatusOK, "audit", p)
}

// ---- policy ----

type ruleRow struct {
	N                                           int
	Name, Effect, Access, Roles, Groups, Filter string
}

type policyData struct {
	Rules                                []ruleRow
	None                                 bool
	Identity, Group, Tags, Action, Topic string
	Asked, Allowed                       bool
	Explain, Error                       string
}

func toRuleRow(i int, r acl.Rule) ruleRow {
	row := ruleRow{N: i + 1, Name: r.Name, Filter: r.Filter, Effect: "allow", Roles: "any", Groups: "any"}
	if r.Effect == acl.Deny {
		row.Effect = "deny"
	}
	var acc []string
	for _, a := range []struct {
		bit  acl.Access
		name string
	}{{acl.Publish, "publish"}, {acl.Subscribe, "subscribe"}, {acl.Retain, "retain"}} {
		if r.Access&a.bit != 0 {
			acc = append(acc, a.name)
		}
	}
	row.Access = strings.Join(acc, ", ")
	if len(r.Roles) > 0 {
		var rs []string
		for _, x := range r.Roles {
			rs = append(rs, string(x))
		}
		row.Roles = strings.Join(rs, ", ")
	}
	if len(r.Groups) > 0 {
		row.Groups = strings.Join(r.Groups, ", ")
	}
	return row
}

func (c *Console) handlePolicy(w http.ResponseWriter, r *http.Request, q req) {
	v := r.URL.Query()
	d := policyData{Identity: strings.TrimSpace(v.Get("identity")), Group: strings.TrimSpace(v.Get("group")), Tags: strings.TrimSpace(v.Get("tags")),
		Action: v.Get("action"), Topic: strings.TrimSpace(v.Get("topic"))}
	var p *acl.Policy
	if c.cfg.Broker != nil {
		p = c.cfg.Broker.Policy()
	}
	if p == nil {
		d.None = true
	} else {
		for i, r := range p.Rules() {
			d.Rules = append(d.Rules, toRuleRow(i, r))
		}
	}
	if d.Identity != "" && p != nil {
		d.Asked = true
		d.explain(p, c.cfg.Registry.DeviceStatus)
	}
	c.render(w, http.StatusOK, "policy", c.newPage(q, "Policy", "policy", d))
}

// explain decides d's question with p: an identity as a SPIFFE URI or
// role/name (device/sensor-1), or a bare device ID whose group and tags
// come from the registry when not given.
func (d *policyData) explain(p *acl.Policy, device func(string) (fleet.DeviceStatus, bool)) {
	id, err := parseIdentity(d.Identity)
	if err != nil {
		d.Error = err.Error()
		return
	}
	s := acl.Subject{Role: id.Role, ID: id.Name, Group: d.Group, Tags: map[string]string{}}
	if st, ok := device(id.Name); ok && id.Role == identity.RoleDevice {
		if s.Group == "" {
			s.Group, d.Group = st.Group, st.Group
		}
		if d.Tags == "" {
			for k, v := range st.Tags {
				s.Tags[k] = v
			}
		}
	}
	for t := range strings.FieldsSeq(strings.ReplaceAll(d.Tags, ",", " ")) {
		k, val, ok := strings.Cut(t, "=")
		if !ok {
			d.Error = fmt.Sprintf("tag %q: want key=value", t)
			return
		}
		s.Tags[k] = val
	}
	if d.Topic == "" {
		d.Error = "give a topic (publish) or a filter (subscribe)"
		return
	}
	var dec acl.Decision
	switch d.Action {
	case "subscribe":
		dec = p.CheckSubscribe(s, d.Topic)
	case "publish-retain":
		dec = p.CheckPublish(s, d.Topic, true)
	default:
		d.Action = "publish"
		dec = p.CheckPublish(s, d.Topic, false)
	}
	d.Allowed, d.Explain = dec.Allowed, p.Explain(dec)
}

func parseIdentity(s string) (identity.Identity, error) {
	if u, err := url.Parse(s); err == nil && u.Scheme == "spiffe" {
		return identity.ParseURI(u, u.Host)
	}
	role, name, ok := strings.Cut(s, "/")
	if !ok {
		role, name = string(identity.RoleDevice), s
	}
	id := identity.Identity{Role: identity.Role(role), Name: name}
	switch id.Role {
	case identity.RoleDevice, identity.RoleService, identity.RoleOperator:
	default:
		return id, fmt.Errorf("identity %q: want role/name (device/sensor-1) or a spiffe:// URI", s)
	}
	if err := identity.ValidateName(name); err != nil {
		return id, fmt.Errorf("identity %q: %w", s, err)
	}
	return id, nil
}
