package server

// Securing NATS (docs/cluster.md, "Securing NATS"): the embedded node's
// routes are mutual TLS with the cluster CA of <data-dir>/cluster, its
// client listener (only when asked) admits the users of a 0600 file over
// TLS, and an external NATS is reached with the TLS and credentials the
// user gives, its sync setting checked when a monitoring URL is given.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/spf13/pflag"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/identity"
)

// ClusterCADir is the cluster CA's directory in a data directory
// (natsnode.CreateCA; `fleetgate init` creates it).
const ClusterCADir = "cluster"

// NATSSecurity are the NATS security settings (ClusterConfig.Security).
type NATSSecurity struct {
	// PlainRoutes: the embedded node's routes without TLS (anyone who
	// reaches the route port joins the cluster). Logged as an error.
	PlainRoutes bool `yaml:"nats_insecure_plain_routes"`
	// ClientUsers is the 0600 file of the client listener's users, one
	// `name:password:role` a line, role monitor or admin.
	ClientUsers string `yaml:"nats_client_users"`
	// CA, Cert, Key, Creds: an external NATS's roots, fleetgate's client
	// certificate and key, a NATS credentials file.
	CA    string `yaml:"nats_ca"`
	Cert  string `yaml:"nats_cert"`
	Key   string `yaml:"nats_key"`
	Creds string `yaml:"nats_creds"`
	// MonitorURLs are the external servers' HTTP monitoring URLs: their
	// JetStream sync setting is checked at start.
	MonitorURLs []string `yaml:"nats_monitor_urls"`
	// AllowUnsynced starts on an external NATS that acknowledges before it
	// syncs (logged as an error).
	AllowUnsynced bool `yaml:"nats_allow_unsynced"`
	// AllowPlaintext accepts nats:// URLs and http:// monitoring URLs
	// (logged as an error): without it only tls:// and https://.
	AllowPlaintext bool `yaml:"nats_allow_plaintext"`
}

var natsSecKeys = []string{"nats-insecure-plain-routes", "nats-client-users", "nats-ca", "nats-cert", "nats-key", "nats-creds", "nats-monitor-urls", "nats-allow-unsynced", "nats-allow-plaintext"}

func init() { keys = append(keys, natsSecKeys...) }

func natsSecFlags(fs *pflag.FlagSet, d NATSSecurity) {
	fs.Bool("nats-insecure-plain-routes", d.PlainRoutes, "with --cluster-name: NATS routes WITHOUT TLS, anyone who reaches --nats-listen joins the cluster (tests only)")
	fs.String("nats-client-users", d.ClientUsers, "with --nats-client-addr: file (0600) of the client listener's users, `name:password:role` a line, role monitor or admin")
	fs.String("nats-ca", d.CA, "with --nats-url: CA file (PEM) the NATS servers' TLS certificates are verified against (default the system roots)")
	fs.String("nats-cert", d.Cert, "with --nats-url: client certificate (PEM) for NATS mTLS")
	fs.String("nats-key", d.Key, "with --nats-url: the client certificate's key (PEM, 0600)")
	fs.String("nats-creds", d.Creds, "with --nats-url: NATS credentials file (user JWT and nkey seed, 0600)")
	fs.StringSlice("nats-monitor-urls", d.MonitorURLs, "with --nats-url: every NATS server's HTTP monitoring URL (comma-separated): fleetgate refuses to start unless each syncs JetStream before acknowledging")
	fs.Bool("nats-allow-plaintext", d.AllowPlaintext, "with --nats-url: accept nats:// URLs and http:// --nats-monitor-urls, WITHOUT TLS (passwords, records and the sync check readable and forgeable on the network; logged as an error)")
	fs.Bool("nats-allow-unsynced", d.AllowUnsynced, "with --nats-monitor-urls: start even when a NATS server acknowledges JetStream writes before syncing them (logged as an error)")
}

func assignNATSSec(s *NATSSecurity, k string, fs *pflag.FlagSet) error {
	var err error
	switch k {
	case "nats-insecure-plain-routes":
		s.PlainRoutes, err = fs.GetBool(k)
	case "nats-client-users":
		s.ClientUsers, err = fs.GetString(k)
	case "nats-ca":
		s.CA, err = fs.GetString(k)
	case "nats-cert":
		s.Cert, err = fs.GetString(k)
	case "nats-key":
		s.Key, err = fs.GetString(k)
	case "nats-creds":
		s.Creds, err = fs.GetString(k)
	case "nats-monitor-urls":
		s.MonitorURLs, err = fs.GetStringSlice(k)
	case "nats-allow-unsynced":
		s.AllowUnsynced, err = fs.GetBool(k)
	case "nats-allow-plaintext":
		s.AllowPlaintext, err = fs.GetBool(k)
	}
	return err
}

func (c ClusterConfig) validateNATSSec() []error {
	s := c.Security
	var errs []error
	if c.NATSClientAddr != "" && s.ClientUsers == "" {
		errs = append(errs, errors.New("nats_client_addr needs nats_client_users (nobody connects to NATS without a password)"))
	}
	if c.ClusterName == "" && (s.PlainRoutes || s.ClientUsers != "" || c.NATSClientAddr != "") {
		errs = append(errs, errors.New("nats_insecure_plain_routes, nats_client_addr and nats_client_users need cluster_name (the embedded NATS)"))
	}
	if c.NATSURL == "" && (s.CA != "" || s.Cert != "" || s.Key != "" || s.Creds != "" || len(s.MonitorURLs) > 0 || s.AllowUnsynced || s.AllowPlaintext) {
		errs = append(errs, errors.New("nats_ca, nats_cert, nats_key, nats_creds, nats_monitor_urls, nats_allow_unsynced and nats_allow_plaintext need nats_url (an external NATS)"))
	}
	if c.NATSURL != "" && !s.AllowPlaintext {
		if err := natsnode.CheckTLS(c.NATSURL, s.MonitorURLs); err != nil {
			errs = append(errs, fmt.Errorf("nats_url / nats_monitor_urls: %w (use tls:// and https://, or --nats-allow-plaintext)", err))
		}
	}
	if (s.Cert == "") != (s.Key == "") {
		errs = append(errs, errors.New("nats_cert and nats_key go together"))
	}
	if s.AllowUnsynced && len(s.MonitorURLs) == 0 {
		errs = append(errs, errors.New("nats_allow_unsynced without nats_monitor_urls: nothing is checked"))
	}
	return errs
}

// embeddedNATSSecurity sets the TLS and users of an embedded node.
func embeddedNATSSecurity(l Layout, cc ClusterConfig, cfg *natsnode.Config) error {
	if cc.Security.PlainRoutes {
		cfg.PlainRoutes = true
	} else {
		ca, err := natsnode.LoadCA(filepath.Join(l.Dir, ClusterCADir))
		if err != nil {
			return err
		}
		if cfg.TLS, err = ca.NodeTLS(cc.NodeName, hosts(cc.NATSListen, cc.NATSAdvertise, cc.NATSClientAddr)...); err != nil {
			return err
		}
	}
	if cc.NATSClientAddr == "" {
		return nil
	}
	users, err := readNATSUsers(cc.Security.ClientUsers)
	if err != nil {
		return err
	}
	cfg.ClientUsers = users
	return nil
}

// hosts are the hosts of addrs (host:port), for the node's certificate.
func hosts(addrs ...string) []string {
	var hs []string
	for _, a := range addrs {
		if h, _, err := net.SplitHostPort(a); err == nil && h != "" {
			hs = append(hs, h)
		}
	}
	return hs
}

// monitorPermissions are a monitor user's: JetStream's account, stream
// and consumer information (replicas, leaders, lag), nothing that reads
// or writes a record. Stream information can list a bucket's keys (a
// subjects filter); keys hold no secret (token secrets are hashes). The
// answers come to the user's own inbox prefix, _INBOX_<user> (`nats
// --inbox-prefix _INBOX_<user>`, nats.go's nats.CustomInboxPrefix), and
// only there: all clients share one account, so a user allowed _INBOX.>
// would receive the replies of every other client (fleetgate's own have
// their prefix, natsnode.InboxPrefix, which no user's covers).
func monitorPermissions(user string) *server.Permissions {
	return &server.Permissions{
		Publish: &server.SubjectPermission{Allow: []string{"$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST",
			"$JS.API.STREAM.INFO.*", "$JS.API.CONSUMER.NAMES.*", "$JS.API.CONSUMER.LIST.*", "$JS.API.CONSUMER.INFO.*.*"}},
		Subscribe: &server.SubjectPermission{Allow: []string{MonitorInboxPrefix(user) + ".>"}},
	}
}

// MonitorInboxPrefix is the only inbox prefix a monitor user may
// subscribe to (a name is a-z 0-9 -: one subject token).
func MonitorInboxPrefix(user string) string { return "_INBOX_" + user }

// readNATSUsers reads the client listener's users file: 0600, one
// `name:password:role` a line (# comments), role monitor or admin (every
// permission), passwords of at least 16 characters.
func readNATSUsers(file string) ([]*server.User, error) {
	fi, err := os.Stat(file)
	if err != nil {
		return nil, fmt.Errorf("nats_client_users: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("nats_client_users: %s has mode %04o; it must be 0600", file, fi.Mode().Perm())
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("nats_client_users: %w", err)
	}
	defer f.Close()
	var users []*server.User
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		parts := strings.Split(line, ":")
		if len(parts) != 3 {
			return nil, fmt.Errorf("nats_client_users: %s:%d: want name:password:role", file, n)
		}
		u := &server.User{Username: parts[0], Password: parts[1]}
		if err := identity.ValidateName(u.Username); err != nil {
			return nil, fmt.Errorf("nats_client_users: %s:%d: %w", file, n, err)
		}
		if seen[u.Username] {
			return nil, fmt.Errorf("nats_client_users: %s:%d: user %s twice", file, n, u.Username)
		}
		seen[u.Username] = true
		if len(u.Password) < 16 {
			return nil, fmt.Errorf("nats_client_users: %s:%d: the password of %s is shorter than 16 characters", file, n, u.Username)
		}
		switch parts[2] {
		case "monitor":
			u.Permissions = monitorPermissions(u.Username)
		case "admin":
		default:
			return nil, fmt.Errorf("nats_client_users: %s:%d: role %q is not monitor or admin", file, n, parts[2])
		}
		users = append(users, u)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("nats_client_users: %w", err)
	}
	if len(users) == 0 {
		return nil, fmt.Errorf("nats_client_users: %s names no user", file)
	}
	return users, nil
}

// dialExternalNATS connects to the external NATS with the configured TLS
// and credentials, and checks its sync setting (or warns that it cannot).
func dialExternalNATS(cc ClusterConfig, log *slog.Logger) (*nats.Conn, error) {
	s := cc.Security
	logPlaintext(cc, log)
	auth := natsnode.ExternalAuth{CAFile: s.CA, CertFile: s.Cert, KeyFile: s.Key, CredsFile: s.Creds}
	opts, err := auth.Options()
	if err != nil {
		return nil, err
	}
	if err := checkExternalSync(auth, s, log); err != nil {
		return nil, err
	}
	return natsnode.Dial(cc.NATSURL, "fleetgate-"+cc.NodeName, log, opts...)
}

// logPlaintext logs an ERROR when nats_allow_plaintext let a URL without
// TLS through (validateNATSSec refuses them otherwise).
func logPlaintext(cc ClusterConfig, log *slog.Logger) {
	if err := natsnode.CheckTLS(cc.NATSURL, cc.Security.MonitorURLs); err != nil && cc.Security.AllowPlaintext {
		log.Error("external NATS: PLAINTEXT (nats_allow_plaintext): passwords, every record, every acknowledgement and the "+
			"sync check cross the network readable and forgeable", "urls", err)
	}
}

func checkExternalSync(auth natsnode.ExternalAuth, s NATSSecurity, log *slog.Logger) error {
	if len(s.MonitorURLs) == 0 {
		log.Warn("external NATS: fleetgate cannot check that JetStream syncs before it acknowledges (no nats_monitor_urls); " +
			"without `jetstream { sync_interval: always }` on every server an acknowledged write can be lost to a " +
			"coordinated power failure (docs/cluster.md)")
		return nil
	}
	hc, err := auth.HTTPClient()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := natsnode.CheckSync(ctx, hc, s.MonitorURLs)
	switch {
	case err == nil:
		for _, g := range got {
			log.Info("external NATS server syncs JetStream before acknowledging", "server", g.Server, "monitor", g.URL)
		}
		return nil
	case errors.Is(err, natsnode.ErrUnsynced) && s.AllowUnsynced:
		log.Error("external NATS: STARTING ANYWAY (nats_allow_unsynced): an acknowledged revocation or token use can be lost "+
			"to a coordinated power failure", "err", err)
		return nil
	case errors.Is(err, natsnode.ErrUnsynced):
		return fmt.Errorf("%w (or start with nats_allow_unsynced, accepting that acknowledged writes can be lost)", err)
	}
	return fmt.Errorf("external NATS sync check: %w", err)
}
