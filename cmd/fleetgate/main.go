// Command fleetgate is the fleetgate server and operator CLI: init, serve,
// tokens, services, devices, audit. It only wires packages together.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

func main() {
	if err := root().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "fleetgate:", err)
		os.Exit(1)
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func root() *cobra.Command {
	r := &cobra.Command{
		Use:           "fleetgate",
		Short:         "TPM-bound device enrollment and an mTLS MQTT broker for IoT fleets",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	r.AddCommand(initCmd(), serveCmd(), tokensCmd(), servicesCmd(), devicesCmd(), certificatesCmd(), policyCmd(), auditCmd(), tpmCmd(), serverCertCmd(), consoleCmd())
	return r
}

func initCmd() *cobra.Command {
	var dataDir, td, operator string
	var hosts []string
	var noDefaultHosts bool
	c := &cobra.Command{
		Use:   "init",
		Short: "Create the PKI (root CA, issuing CA, server and operator certificates) in a data directory",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ca.Initialized(dataDir) {
				fmt.Fprintf(cmd.OutOrStdout(), "%s already holds a CA; nothing was changed (fleetgate init never overwrites a CA).\n", dataDir)
				return nil
			}
			hosts = server.WithDefaultHosts(hosts, noDefaultHosts)
			res, err := server.Init(dataDir, ca.InitOptions{TrustDomain: td, Hosts: hosts, Operator: operator})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "Initialised %s (trust domain %s)\n", dataDir, td)
			fmt.Fprintf(out, "  root CA (P-384):      %s  key %s (0600: move it offline)\n", ca.RootCertFile, ca.RootKeyFile)
			fmt.Fprintf(out, "  issuing CA (P-256):   %s\n", ca.IssuingCertFile)
			fmt.Fprintf(out, "  server certificate:   %s for %s\n", ca.ServerCertFile, strings.Join(server.CertHosts(res.Server), ", "))
			fmt.Fprintf(out, "  operator certificate: %s (%s)\n", ca.OperatorCertFile, operator)
			return nil
		},
	}
	c.Flags().StringVar(&dataDir, "data-dir", envOr("FLEETGATE_DATA_DIR", server.DefaultDataDir), "data directory (env FLEETGATE_DATA_DIR)")
	c.Flags().StringVar(&td, "trust-domain", envOr("FLEETGATE_TRUST_DOMAIN", "fleetgate.local"), "trust domain of the SPIFFE identities")
	c.Flags().StringSliceVar(&hosts, "host", nil, "host name or IP of the server certificate, besides localhost, 127.0.0.1 and ::1 (repeat; later: fleetgate server-cert renew --host)")
	c.Flags().BoolVar(&noDefaultHosts, "no-default-hosts", false, "leave localhost, 127.0.0.1 and ::1 out of the server certificate")
	c.Flags().StringVar(&operator, "operator", "admin", "name of the first operator")
	return c
}

func serveCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "serve",
		Short: "Run the enrollment API and the MQTT broker",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := server.Load(cmd.Flags(), os.Getenv)
			if err != nil {
				return fmt.Errorf("configuration:\n%w", err)
			}
			log := newLogger(cfg.LogLevel, cfg.LogFormat)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			reload := make(chan struct{}, 1)
			go func() {
				for range hup {
					select {
					case reload <- struct{}{}:
					default:
					}
				}
			}()
			cfg.Logger, cfg.Reload = log, reload
			s, err := server.New(cfg)
			if err == nil {
				err = s.Run(ctx)
			}
			if err == nil {
				log.Info("fleetgate stopped")
			}
			return err
		},
	}
	server.Flags(c.Flags(), server.Defaults())
	return c
}

func newLogger(level, format string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	o := &slog.HandlerOptions{Level: l}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, o))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, o))
}

// operatorCmd is a group of operator commands, with the flags that say how
// to reach the operator API.
func operatorCmd(use, short string) (*cobra.Command, *adminFlags) {
	af := &adminFlags{}
	c := &cobra.Command{Use: use, Short: short}
	af.add(c)
	return c, af
}

// adminFlags are the flags of every command that calls the admin API.
type adminFlags struct {
	server, dataDir, cert, key, caFile string
}

func (a *adminFlags) add(c *cobra.Command) {
	c.PersistentFlags().StringVar(&a.server, "server", envOr("FLEETGATE_SERVER", "https://localhost:8443"), "enrollment/admin API URL (env FLEETGATE_SERVER)")
	c.PersistentFlags().StringVar(&a.dataDir, "data-dir", envOr("FLEETGATE_DATA_DIR", server.DefaultDataDir), "data directory holding the operator certificate")
	c.PersistentFlags().StringVar(&a.cert, "cert", "", "operator certificate (default: from the data directory)")
	c.PersistentFlags().StringVar(&a.key, "key", "", "operator key (default: from the data directory)")
	c.PersistentFlags().StringVar(&a.caFile, "ca", "", "CA certificate to trust (default: from the data directory)")
}

func (a *adminFlags) client() (*client.Client, error) {
	cr := client.FromDataDir(a.dataDir)
	if a.cert != "" {
		cr.CertFile = a.cert
	}
	if a.key != "" {
		cr.KeyFile = a.key
	}
	if a.caFile != "" {
		cr.CAFile = a.caFile
	}
	return client.New(a.server, cr)
}

// call calls fn with a client of the operator API (the flags'
// credentials) and a context that ends after 30 seconds: the body of every
// operator command.
func (a *adminFlags) call(cmd *cobra.Command, fn func(ctx context.Context, cl *client.Client) error) error {
	cl, err := a.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
	defer cancel()
	return fn(ctx, cl)
}

func tokensCmd() *cobra.Command {
	c, af := operatorCmd("tokens", "Bootstrap tokens for devices without TPM")
	var device, group string
	var ttl time.Duration
	var jsonOut bool
	create := &cobra.Command{
		Use:   "create",
		Short: "Mint a one-time bootstrap token bound to a device ID",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				t, err := cl.CreateToken(ctx, api.TokenCreateRequest{DeviceID: device, Group: group, TTL: ttl})
				if err != nil {
					return err
				}
				if jsonOut {
					return json.NewEncoder(cmd.OutOrStdout()).Encode(t)
				}
				fmt.Fprintln(cmd.OutOrStdout(), t.Token)
				fmt.Fprintf(cmd.ErrOrStderr(), "token for device %s (group %s), single use, expires %s\n", t.DeviceID, t.Group, t.ExpiresAt.Format(time.RFC3339))
				return nil
			})
		},
	}
	create.Flags().StringVar(&device, "device", "", "device ID (required)")
	create.Flags().StringVar(&group, "group", "default", "device group")
	create.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "token lifetime")
	create.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	_ = create.MarkFlagRequired("device")
	c.AddCommand(create)
	return c
}

func servicesCmd() *cobra.Command {
	c, af := operatorCmd("services", "Certificates for backend services")
	var name, out string
	var ttl time.Duration
	issue := &cobra.Command{
		Use:   "issue",
		Short: "Issue a service certificate (key generated by the server, written 0600)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := identity.ValidateName(name); err != nil {
				return err
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.IssueService(ctx, api.ServiceIssueRequest{Name: name, TTL: ttl})
				if err != nil {
					return err
				}
				if out == "" {
					out = server.Layout{Dir: af.dataDir}.ServiceDir(name)
				}
				if err := os.MkdirAll(out, 0o700); err != nil {
					return err
				}
				files := []struct {
					name string
					data string
					mode os.FileMode
				}{{"cert.pem", r.CertificateChainPEM, 0o644}, {"key.pem", r.PrivateKeyPEM, 0o600}, {"ca.pem", r.CACertificatesPEM, 0o644}}
				for _, f := range files {
					if err := writeFileMode(filepath.Join(out, f.name), []byte(f.data), f.mode); err != nil {
						return err
					}
				}
				fmt.Fprintf(cmd.OutOrStdout(), "service %s: %s/{cert,key,ca}.pem (serial %s, expires %s)\n", r.Identity, out, r.Serial, r.NotAfter.Format(time.RFC3339))
				return nil
			})
		},
	}
	issue.Flags().StringVar(&name, "name", "", "service name (required)")
	issue.Flags().StringVar(&out, "out", "", "output folder (default <data-dir>/services/<name>)")
	issue.Flags().DurationVar(&ttl, "ttl", 0, "certificate lifetime (default: the server's)")
	_ = issue.MarkFlagRequired("name")
	c.AddCommand(issue)
	return c
}

func devicesCmd() *cobra.Command {
	c, af := operatorCmd("devices", "Devices in the registry")
	list := &cobra.Command{
		Use:   "list",
		Short: "List devices",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				ds, err := cl.Devices(ctx)
				if err != nil {
					return err
				}
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tGROUP\tSTATE\tONLINE\tMETHOD\tSERIAL\tEXPIRES")
				for _, d := range ds {
					online := "no"
					if d.Online {
						online = "yes"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.Group, d.State, online, d.AttestationMethod, d.Serial, d.NotAfter.Format(time.DateOnly))
				}
				return tw.Flush()
			})
		},
	}
	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show one device",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				d, err := cl.Device(ctx, args[0])
				if err != nil {
					return err
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(d)
			})
		},
	}
	c.AddCommand(list, show)
	addEKCommands(c, af)
	addLifecycleCommands(c, af)
	return c
}

func auditCmd() *cobra.Command {
	var af adminFlags
	var device, cursor string
	var limit int
	var all bool
	c := &cobra.Command{
		Use:   "audit",
		Short: "Show the audit log, newest first",
		Long: `Show the audit log, newest first, one page at a time: --limit records
(default 50) older than --cursor. When there are older records, the command
that shows the next page is printed on stderr. --all reads every page.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				tw := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "SEQ\tTIME\tACTOR\tACTION\tDEVICE\tOUTCOME\tREASON")
				for {
					p, err := cl.AuditPage(ctx, device, limit, cursor)
					if err != nil {
						return err
					}
					for _, a := range p.Records {
						fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Seq, a.Time.Format(time.RFC3339), a.Actor, a.Action, a.DeviceID, a.Outcome, a.Reason)
					}
					cursor = p.Next
					if !all || cursor == "" {
						break
					}
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				if cursor != "" {
					next := fmt.Sprintf("fleetgate audit --limit %d --cursor %s", limit, cursor)
					if device != "" {
						next += " --device " + device
					}
					fmt.Fprintf(cmd.ErrOrStderr(), "older records: %s\n", next)
				}
				return nil
			})
		},
	}
	af.add(c)
	c.Flags().StringVar(&device, "device", "", "only this device (read through the registry's per-device index)")
	c.Flags().IntVar(&limit, "limit", 50, fmt.Sprintf("records per page (at most %d)", api.MaxAuditLimit))
	c.Flags().StringVar(&cursor, "cursor", "", "continue after a previous page (printed by it)")
	c.Flags().BoolVar(&all, "all", false, "read every page")
	return c
}

// writeFileMode writes data with exactly mode, also when the file existed
// with a looser one.
func writeFileMode(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
