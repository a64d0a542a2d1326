package main

import (
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/server"
)

// serverCertCmd is `fleetgate server-cert show|renew`: the names the
// server certificate holds, and a new certificate with names added or
// removed, or before the year is up. Local: it reads the data directory.
func serverCertCmd() *cobra.Command {
	var dataDir string
	c := &cobra.Command{Use: "server-cert", Short: "Show or renew the server certificate (and the operator certificate) of a data directory", Args: cobra.NoArgs}
	c.PersistentFlags().StringVar(&dataDir, "data-dir", envOr("FLEETGATE_DATA_DIR", server.DefaultDataDir), "data directory (env FLEETGATE_DATA_DIR)")

	show := &cobra.Command{
		Use: "show", Short: "Print the names, issuer and expiry of the server and operator certificates", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			srv, err := server.ServerCertificate(dataDir)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			printCert(out, "server certificate", srv)
			fmt.Fprintf(out, "  names:     %s\n", strings.Join(server.CertHosts(srv), ", "))
			if op, err := ca.ReadCertFile(server.Layout{Dir: dataDir}.OperatorCert()); err == nil {
				printCert(out, "operator certificate", op)
			}
			for _, w := range server.ExpiringOwnCerts(dataDir, time.Now()) {
				fmt.Fprintln(out, "WARNING:", w)
			}
			return nil
		},
	}

	var add, remove []string
	var serverOnly bool
	var caKey, configPath string
	renew := &cobra.Command{
		Use:   "renew",
		Short: "Issue a new server certificate (a year, names kept, --host added, --remove-host removed) and, unless --server-only, a new operator certificate",
		Long: `renew issues the server certificate again with the issuing CA of the data
directory: the names it holds, plus each --host, minus each --remove-host.
Restart the server to serve it. It signs with the issuing CA's key where
serve finds it: --ca-key, else FLEETGATE_CA_KEY, else ca_key in the
--config file (or FLEETGATE_CONFIG's), else <data-dir>/ca/issuing.key; a
key in an HSM or TPM works as for serve. Unless --server-only, the operator
certificate is renewed too (new key, same name); that needs the registry,
so stop the server first.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			old, err := server.ServerCertificate(dataDir)
			if err != nil {
				return err
			}
			for _, h := range append(append([]string(nil), add...), remove...) {
				if strings.TrimSpace(h) == "" || strings.ContainsAny(h, " /:") && net.ParseIP(h) == nil {
					return fmt.Errorf("not a host name or IP: %q", h)
				}
			}
			hosts := server.WithDefaultHosts(append(server.CertHosts(old), add...), true)
			var kept []string
			for _, h := range hosts {
				if !containsHost(remove, h) {
					kept = append(kept, h)
				}
			}
			for _, r := range remove {
				if !containsHost(hosts, r) {
					return fmt.Errorf("--remove-host %s: the server certificate does not hold it (it holds %s)", r, strings.Join(hosts, ", "))
				}
			}
			if caKey == "" {
				if caKey, err = server.ConfiguredCAKey(configPath, os.Getenv); err != nil {
					return err
				}
			}
			if !serverOnly {
				// the registry first: a server still running fails here, before anything changes
				op, err := server.RenewOperatorCert(dataDir, caKey)
				if err != nil {
					return fmt.Errorf("operator certificate: %w (--server-only renews the server certificate alone)", err)
				}
				printCert(cmd.OutOrStdout(), "renewed operator certificate", op)
			}
			srv, err := server.RenewServerCert(dataDir, caKey, kept)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			printCert(out, "renewed server certificate", srv)
			fmt.Fprintf(out, "  names:     %s\n", strings.Join(server.CertHosts(srv), ", "))
			fmt.Fprintln(out, "Restart `fleetgate serve` to serve the new certificate (the previous files are kept as *.old).")
			return nil
		},
	}
	renew.Flags().StringSliceVar(&add, "host", nil, "host name or IP to add (repeat)")
	renew.Flags().StringSliceVar(&remove, "remove-host", nil, "host name or IP to remove (repeat)")
	renew.Flags().BoolVar(&serverOnly, "server-only", false, "renew the server certificate only (works while the server runs)")
	renew.Flags().StringVar(&caKey, "ca-key", "", "issuing CA key, as serve's --ca-key (default: env FLEETGATE_CA_KEY, else ca_key of --config, else <data-dir>/ca/issuing.key)")
	renew.Flags().StringVar(&configPath, "config", "", "serve's YAML config file, for its ca_key (env FLEETGATE_CONFIG)")
	c.AddCommand(show, renew)
	return c
}

func containsHost(list []string, h string) bool {
	for _, x := range list {
		if strings.EqualFold(x, h) {
			return true
		}
		if a, b := net.ParseIP(x), net.ParseIP(h); a != nil && b != nil && a.Equal(b) {
			return true
		}
	}
	return false
}

func printCert(out io.Writer, what string, c *x509.Certificate) {
	fmt.Fprintf(out, "%s: %s\n", what, c.Subject.CommonName)
	fmt.Fprintf(out, "  serial:    %s\n", ca.SerialString(c.SerialNumber))
	fmt.Fprintf(out, "  issuer:    %s\n", c.Issuer.CommonName)
	fmt.Fprintf(out, "  not after: %s (in %d days)\n", c.NotAfter.UTC().Format(time.RFC3339), int(time.Until(c.NotAfter).Hours()/24))
}
