package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

// caCmd is `fleetgate ca`: issuing-CA rotation with overlap (docs/pki.md).
func caCmd() *cobra.Command {
	c, af := operatorCmd("ca", "Issuing CAs: status, rotation, import of a root-signed CA, retirement")
	var jsonOut bool
	status := &cobra.Command{
		Use:   "status",
		Short: "List the issuing CAs with the active devices that still hold each one's certificates",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				st, err := cl.CAStatus(ctx)
				if err != nil {
					return err
				}
				if jsonOut {
					return json.NewEncoder(cmd.OutOrStdout()).Encode(st)
				}
				out := cmd.OutOrStdout()
				online := "offline (rotation gives a CSR to sign)"
				if st.RootKeyOnline {
					online = "in the data directory (move it offline: see docs/pki.md)"
				}
				fmt.Fprintf(out, "root: %s\nroot key: %s\n\n", st.Root, online)
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tSTATE\tACTIVE DEVICES\tSERVICES+OPERATORS\tNOT AFTER\tSUBJECT")
				for _, i := range st.Issuers {
					na := "-"
					if !i.NotAfter.IsZero() {
						na = i.NotAfter.UTC().Format(time.RFC3339)
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\n", i.ID, i.State, i.ActiveDevices, i.Principals, na, i.Subject)
				}
				return tw.Flush()
			})
		},
	}
	status.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	var csrOut string
	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Create a new issuing CA under the root; the old one stays trusted until retired",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.CARotate(ctx)
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if r.Issuer.State == "pending" {
					if csrOut == "" {
						csrOut = "issuing-" + r.Issuer.ID + ".csr"
					}
					if err := os.WriteFile(csrOut, []byte(r.Issuer.CSRPEM), 0o644); err != nil {
						return err
					}
					fmt.Fprintf(out, "the root key is offline: new issuing CA %s is pending; its CSR is in %s\n", r.Issuer.ID, csrOut)
					fmt.Fprintf(out, "have the root sign it as a CA (basicConstraints CA:TRUE, pathlen:0; keyUsage keyCertSign, cRLSign), then run:\n  fleetgate ca import-issuing SIGNED.crt\n")
					return nil
				}
				fmt.Fprintf(out, "issuing CA %s is current: new certificates come from it; the previous one stays trusted until `fleetgate ca retire`\n", r.Issuer.ID)
				fmt.Fprintf(out, "server certificate re-issued: %t; operator certificate re-issued: %t\n", r.ServerReissued, r.OperatorReissued)
				return nil
			})
		},
	}
	rotate.Flags().StringVar(&csrOut, "csr-out", "", "where to write the CSR when the root is offline (default issuing-<id>.csr)")
	imp := &cobra.Command{
		Use:   "import-issuing CERT",
		Short: "Install an issuing CA certificate signed by the offline root (after init --external-root or rotate)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pemBytes, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if ca.PendingExternalRoot(af.dataDir) {
				// The end of init --external-root: no server runs yet.
				res, err := server.CompleteExternalRoot(af.dataDir, pemBytes)
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "issuing CA %s installed in %s; server and operator certificates issued:\n", res.Authority.Current().ID, af.dataDir)
				fmt.Fprintf(out, "  server certificate:   %s\n  operator certificate: %s\n", ca.ServerCertFile, ca.OperatorCertFile)
				return nil
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.CAImport(ctx, string(pemBytes))
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "issuing CA %s is current; the previous one stays trusted until `fleetgate ca retire`\n", r.Issuer.ID)
				fmt.Fprintf(out, "server certificate re-issued: %t; operator certificate re-issued: %t\n", r.ServerReissued, r.OperatorReissued)
				return nil
			})
		},
	}
	var force bool
	retire := &cobra.Command{
		Use:   "retire ID",
		Short: "Stop trusting an issuing CA (refused while active devices hold its certificates, unless --force)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.CARetire(ctx, args[0], force)
				var e *api.Error
				if errors.As(err, &e) && e.Code == api.ReasonCAInUse {
					return fmt.Errorf("%w\n(check `fleetgate ca status`; devices move over as they renew)", err)
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "issuing CA %s retired: no longer trusted; %d sessions on it closed\n", r.Issuer.ID, r.SessionsClosed)
				return nil
			})
		},
	}
	retire.Flags().BoolVar(&force, "force", false, "retire although active devices still hold its certificates (they are locked out)")
	c.AddCommand(status, rotate, imp, retire)
	return c
}

// initExternalRoot is `fleetgate init --external-root ROOT.crt`: the root
// key stays elsewhere; the issuing CA's key is created here and its CSR
// written for the root to sign.
func initExternalRoot(cmd *cobra.Command, dataDir, rootFile string, o ca.InitOptions) error {
	rootPEM, err := os.ReadFile(rootFile)
	if err != nil {
		return err
	}
	if _, err := ca.InitExternalRoot(dataDir, o, rootPEM); err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	csr := filepath.Join(dataDir, ca.IssuingCSRFile)
	fmt.Fprintf(out, "Initialised %s under the external root %s (trust domain %s); no root key is kept here.\n", dataDir, rootFile, o.TrustDomain)
	fmt.Fprintf(out, "Have the root sign the issuing CA request %s as a CA certificate\n", csr)
	fmt.Fprintf(out, "(basicConstraints critical CA:TRUE, pathlen:0; keyUsage critical keyCertSign, cRLSign), e.g.:\n")
	fmt.Fprintf(out, "  openssl x509 -req -in %s -CA root.crt -CAkey root.key -CAcreateserial -days 1825 -extfile issuing.ext -out issuing.crt\n", csr)
	fmt.Fprintf(out, "then install it:\n  fleetgate ca import-issuing issuing.crt --data-dir %s\n", dataDir)
	return nil
}
