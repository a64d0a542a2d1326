// Command fleetgate is the fleetgate server and operator CLI: init, serve,
// tokens, services, devices, audit. It only wires packages together.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

func main() {
	if err := root().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "fleetgate:", err)
		os.Exit(exitCode(err))
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
	r.AddCommand(initCmd(), serveCmd(), tokensCmd(), servicesCmd(), devicesCmd(), certificatesCmd(), policyCmd(), auditCmd(), tpmCmd(), serverCertCmd(), consoleCmd(), diagnoseCmd())
	r.AddCommand(caCmd()) // ca.go: issuing-CA rotation
	addAdminCommands(r)
	strict(r)
	return r
}

func initCmd() *cobra.Command {
	var dataDir, td, operator, externalRoot, caKey string
	var hosts []string
	var noDefaultHosts bool
	c := &cobra.Command{
		Use:   "init",
		Short: "Create the PKI (root CA, issuing CA, server and operator certificates) in a data directory",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ca.Initialized(dataDir) {
				return initClusterCAOnly(cmd.OutOrStdout(), dataDir)
			}
			hosts = server.WithDefaultHosts(hosts, noDefaultHosts)
			if externalRoot != "" {
				if caKey != "" {
					return usageError{errors.New("--external-root with --ca-key: the issuing key under an external root is a file for now (docs/pki.md)")}
				}
				return initExternalRoot(cmd, dataDir, externalRoot, ca.InitOptions{TrustDomain: td, Hosts: hosts, Operator: operator})
			}
			res, err := initWithCAKey(dataDir, caKey, ca.InitOptions{TrustDomain: td, Hosts: hosts, Operator: operator}, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "Initialised %s (trust domain %s)\n", dataDir, td)
			fmt.Fprintf(out, "  root CA (P-384):      %s  key %s (0600: move it offline)\n", ca.RootCertFile, ca.RootKeyFile)
			fmt.Fprintf(out, "  issuing CA (P-256):   %s\n", ca.IssuingCertFile)
			fmt.Fprintf(out, "  server certificate:   %s for %s\n", ca.ServerCertFile, strings.Join(server.CertHosts(res.Server), ", "))
			fmt.Fprintf(out, "  operator certificate: %s (%s)\n", ca.OperatorCertFile, operator)
			fmt.Fprintf(out, "  NATS cluster CA:      %s/ (key 0600; a cluster's nodes share it: copy the data directory)\n", server.ClusterCADir)
			fmt.Fprintf(out, "The root key %s should now be moved off this machine (docs/pki.md, \"Offline root\"): rotation then asks the offline root to sign.\n", ca.RootKeyFile)
			return nil
		},
	}
	c.Flags().StringVar(&dataDir, "data-dir", envOr("FLEETGATE_DATA_DIR", server.DefaultDataDir), "data directory (env FLEETGATE_DATA_DIR)")
	c.Flags().StringVar(&td, "trust-domain", envOr("FLEETGATE_TRUST_DOMAIN", "fleetgate.local"), "trust domain of the SPIFFE identities")
	c.Flags().StringSliceVar(&hosts, "host", nil, "host name or IP of the server certificate, besides localhost, 127.0.0.1 and ::1 (repeat; later: fleetgate server-cert renew --host)")
	c.Flags().BoolVar(&noDefaultHosts, "no-default-hosts", false, "leave localhost, 127.0.0.1 and ::1 out of the server certificate")
	c.Flags().StringVar(&operator, "operator", "admin", "name of the first operator")
	c.Flags().StringVar(&externalRoot, "external-root", "", "root CA certificate kept elsewhere: write an issuing-CA CSR for it to sign (then `fleetgate ca import-issuing`)")
	c.Flags().StringVar(&caKey, "ca-key", "", "create the issuing CA key in this store: pkcs11:RFC-7512-URI or tpm:handle=0x81...;device=PATH (default: "+ca.IssuingKeyFile+")")
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
