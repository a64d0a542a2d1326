package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

// The fleet's commands: tokens, services, operators, devices, groups and
// the audit log.

func date(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format(time.RFC3339)
}

func tokensCmd() *cobra.Command {
	c, af := operatorCmd("tokens", "Bootstrap tokens for devices without TPM")
	var device, group string
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create",
		Short: "Mint a one-time bootstrap token bound to a device ID",
	}
	createJSON := jsonFlag(create)
	create.RunE = func(cmd *cobra.Command, _ []string) error {
		id, err := nameOf(identity.RoleDevice, device)
		if err != nil {
			return err
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			t, err := cl.CreateToken(ctx, api.TokenCreateRequest{DeviceID: id, Group: group, TTL: ttl})
			if err != nil {
				return err
			}
			if *createJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(t)
			}
			fmt.Fprintln(cmd.OutOrStdout(), t.Token)
			fmt.Fprintf(cmd.ErrOrStderr(), "token for device %s (group %s), single use, expires %s\n", t.DeviceID, t.Group, t.ExpiresAt.Format(time.RFC3339))
			return nil
		})
	}
	create.Flags().StringVar(&device, "device", "", "device ID (required)")
	create.Flags().StringVar(&group, "group", "default", "device group")
	create.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "token lifetime")
	_ = create.MarkFlagRequired("device")

	var lf listFlags
	var state, ldevice, lgroup string
	list := &cobra.Command{Use: "list", Short: "List bootstrap tokens (never their secrets): unused, used, expired, revoked"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.Flags().StringVar(&state, "state", "", "only unused, used, expired or revoked tokens")
	list.Flags().StringVar(&ldevice, "device", "", "only this device's tokens")
	list.Flags().StringVar(&lgroup, "group", "", "only tokens of this group")
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		q := url.Values{}
		if state != "" {
			q.Set("state", state)
		}
		if lgroup != "" {
			q.Set("group", lgroup)
		}
		if ldevice != "" {
			id, err := nameOf(identity.RoleDevice, ldevice)
			if err != nil {
				return err
			}
			q.Set("device", id)
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			ts, err := pages(&lf, cmd, q, func(q url.Values) ([]api.Token, error) { return cl.Tokens(ctx, q) }, func(t api.Token) string { return t.ID })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(ts))
			}
			var rows [][]string
			for _, t := range ts {
				rows = append(rows, []string{t.ID, t.DeviceID, t.Group, t.State, t.CreatedBy, date(t.ExpiresAt), date(t.UsedAt)})
			}
			return table(cmd.OutOrStdout(), "ID\tDEVICE\tGROUP\tSTATE\tCREATED BY\tEXPIRES\tUSED", rows)
		})
	}

	revoke := &cobra.Command{Use: "revoke TOKEN-ID", Short: "Revoke an unused token (the ID `tokens list` prints, or the whole token)", Args: exactArgs("TOKEN-ID")}
	revokeJSON := jsonFlag(revoke)
	revoke.RunE = func(cmd *cobra.Command, args []string) error {
		id := args[0]
		if tid, _, err := parseTokenID(id); err == nil {
			id = tid
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			t, err := cl.RevokeToken(ctx, id)
			if err != nil {
				return err
			}
			if *revokeJSON {
				return printJSON(cmd.OutOrStdout(), t)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "token %s (device %s): %s\n", t.ID, t.DeviceID, t.State)
			return nil
		})
	}
	c.AddCommand(create, list, revoke)
	return c
}

// orEmpty makes a nil list print as [] in JSON.
func orEmpty[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// parseTokenID returns the ID of a whole token fgt_<id>_<secret>.
func parseTokenID(tok string) (string, string, error) {
	var id, secret string
	if len(tok) > 4 && tok[:4] == "fgt_" {
		rest := tok[4:]
		for i := range len(rest) {
			if rest[i] == '_' {
				id, secret = rest[:i], rest[i+1:]
				return id, secret, nil
			}
		}
	}
	return "", "", errors.New("not a token")
}

// certFiles writes an issued certificate (and the key, if any) to dir.
func certFiles(dir string, r *api.ServiceIssueResponse, keyPEM []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{{"cert.pem", []byte(r.CertificateChainPEM), 0o644}, {"ca.pem", []byte(r.CACertificatesPEM), 0o644}}
	if r.PrivateKeyPEM != "" {
		keyPEM = []byte(r.PrivateKeyPEM)
	}
	if keyPEM != nil {
		files = append(files, struct {
			name string
			data []byte
			mode os.FileMode
		}{"key.pem", keyPEM, 0o600})
	}
	for _, f := range files {
		if err := writeFileMode(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// keyAndCSR returns the CSR to send: the file's (no key written), else one
// for a P-256 key made here, which is returned to be written (0600). The
// server never makes or sends the key.
func keyAndCSR(csrFile, name string) (csr, keyPEM []byte, err error) {
	if csrFile != "" {
		b, err := os.ReadFile(csrFile)
		if err != nil {
			return nil, nil, err
		}
		if p, _ := pem.Decode(b); p != nil {
			b = p.Bytes
		}
		return b, nil, nil
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, k)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err = ca.KeyPEM(k)
	return csr, keyPEM, err
}

func servicesCmd() *cobra.Command {
	c, af := operatorCmd("services", "Backend services: their certificates, by name")
	c.Long = `A service is a name with certificates (no device record). Its MQTT client ID
is <name>, or <name>:<suffix> for each further connection (replicas, a sender
and a listener); the policy applies to the identity service/<name>.`
	issueCmd := func(use, short string, renew bool) *cobra.Command {
		var name, out, csrFile string
		var ttl time.Duration
		cmd := &cobra.Command{Use: use, Short: short}
		if renew {
			cmd.Args = exactArgs("NAME")
		}
		js := jsonFlag(cmd)
		cmd.RunE = func(cmd *cobra.Command, args []string) error {
			if renew {
				name = args[0]
			}
			n, err := nameOf(identity.RoleService, name)
			if err != nil {
				return err
			}
			csr, keyPEM, err := keyAndCSR(csrFile, n)
			if err != nil {
				return err
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				var r *api.ServiceIssueResponse
				if renew {
					r, err = cl.RenewService(ctx, n, api.ServiceRenewRequest{CSR: csr, TTL: ttl})
				} else {
					r, err = cl.IssueService(ctx, api.ServiceIssueRequest{Name: n, CSR: csr, TTL: ttl})
				}
				if err != nil {
					return err
				}
				if out == "" {
					out = server.Layout{Dir: af.dataDir}.ServiceDir(n)
				}
				if err := certFiles(out, r, keyPEM); err != nil {
					return err
				}
				if *js {
					r.PrivateKeyPEM = ""
					return printJSON(cmd.OutOrStdout(), r)
				}
				files := "{cert,ca}.pem"
				if keyPEM != nil {
					files = "{cert,key,ca}.pem"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "service %s: %s/%s (serial %s, expires %s)\n", r.Identity, out, files, r.Serial, r.NotAfter.Format(time.RFC3339))
				return nil
			})
		}
		if !renew {
			cmd.Flags().StringVar(&name, "name", "", "service name (required)")
			_ = cmd.MarkFlagRequired("name")
		}
		cmd.Flags().StringVar(&out, "out", "", "output folder (default <data-dir>/services/<name>)")
		cmd.Flags().StringVar(&csrFile, "csr", "", "PKCS#10 request (PEM or DER) whose key the certificate is for; default: a P-256 key made here (0600), never by the server")
		cmd.Flags().DurationVar(&ttl, "ttl", 0, "certificate lifetime (default: the server's)")
		return cmd
	}
	issue := issueCmd("issue", "Issue a certificate for a new service (key made here, or --csr)", false)
	renew := issueCmd("renew NAME", "Issue a new certificate for an existing service (key made here, or --csr)", true)

	var lf listFlags
	var state string
	list := &cobra.Command{Use: "list", Short: "List services: state, certificate expiry, live connections"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.Flags().StringVar(&state, "state", "", "only active, expired or revoked services")
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		q := url.Values{}
		if state != "" {
			q.Set("state", state)
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			ss, err := pages(&lf, cmd, q, func(q url.Values) ([]api.Service, error) { return cl.Services(ctx, q) }, func(s api.Service) string { return s.Name })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(ss))
			}
			var rows [][]string
			for _, s := range ss {
				rows = append(rows, []string{s.Name, s.State, date(s.NotAfter), fmt.Sprint(s.Online)})
			}
			return table(cmd.OutOrStdout(), "NAME\tSTATE\tEXPIRES\tCONNECTIONS", rows)
		})
	}
	show := &cobra.Command{Use: "show NAME", Short: "Show a service and its certificates", Args: exactArgs("NAME")}
	showJSON := jsonFlag(show)
	show.RunE = func(cmd *cobra.Command, args []string) error {
		n, err := nameOf(identity.RoleService, args[0])
		if err != nil {
			return err
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			s, err := cl.Service(ctx, n)
			if err != nil {
				return err
			}
			if *showJSON {
				return printJSON(cmd.OutOrStdout(), s)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "service %s (%s): %s, %d live connection(s)\n", s.Name, s.Identity, s.State, s.Online)
			return printCerts(cmd, s.Certificates)
		})
	}
	var reason, code string
	revoke := &cobra.Command{Use: "revoke NAME", Short: "Revoke every certificate of a service (its live connections are closed)", Args: exactArgs("NAME")}
	revokeJSON := jsonFlag(revoke)
	revoke.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log and the CRL; required)")
	revoke.Flags().StringVar(&code, "reason-code", "", "CRL reason: keyCompromise, cessationOfOperation, superseded, ... (default: from --reason)")
	revoke.RunE = func(cmd *cobra.Command, args []string) error {
		n, err := nameOf(identity.RoleService, args[0])
		if err != nil {
			return err
		}
		if reason == "" {
			return usageError{errors.New("--reason is required: the audit log and the CRL keep it")}
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			r, err := cl.RevokeService(ctx, n, api.StateChangeRequest{Reason: reason, ReasonCode: code})
			if err != nil {
				return err
			}
			if *revokeJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "service %s: revoked certificates %v; %d live connection(s) closed\n", r.Name, r.RevokedSerials, r.SessionsClosed)
			return nil
		})
	}
	c.AddCommand(issue, renew, list, show, revoke)
	return c
}

func printCerts(cmd *cobra.Command, cs []api.Certificate) error {
	var rows [][]string
	for _, c := range cs {
		st := "valid"
		if c.Revoked {
			st = "revoked: " + c.RevokeReason
		} else if time.Now().After(c.NotAfter) {
			st = "expired"
		}
		rows = append(rows, []string{c.Serial, date(c.IssuedAt), date(c.NotAfter), st})
	}
	return table(cmd.OutOrStdout(), "SERIAL\tISSUED\tEXPIRES\tSTATE", rows)
}

func operatorsCmd() *cobra.Command {
	c, af := operatorCmd("operators", "Operators of the admin API and their roles (admin, read-only)")
	var name, role, out, csrFile string
	add := &cobra.Command{Use: "add", Short: "Add an operator with a role and issue its certificate (key made here, or --csr)"}
	addJSON := jsonFlag(add)
	add.Flags().StringVar(&name, "name", "", "operator name (required)")
	add.Flags().StringVar(&role, "role", api.OperatorAdmin, "admin or read-only")
	add.Flags().StringVar(&out, "out", "", "output folder (default <data-dir>/operators/<name>)")
	add.Flags().StringVar(&csrFile, "csr", "", "PKCS#10 request (PEM or DER); default: a P-256 key made here (0600)")
	_ = add.MarkFlagRequired("name")
	add.RunE = func(cmd *cobra.Command, _ []string) error {
		n, err := nameOf(identity.RoleOperator, name)
		if err != nil {
			return err
		}
		if role != api.OperatorAdmin && role != api.OperatorReadOnly {
			return usageError{fmt.Errorf("--role %q: admin or read-only", role)}
		}
		csr, keyPEM, err := keyAndCSR(csrFile, n)
		if err != nil {
			return err
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			r, err := cl.AddOperator(ctx, api.OperatorAddRequest{Name: n, Role: role, CSR: csr})
			if err != nil {
				return err
			}
			if out == "" {
				out = filepath.Join(af.dataDir, "operators", n)
			}
			if err := certFiles(out, r, keyPEM); err != nil {
				return err
			}
			if *addJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operator %s (%s): %s/{cert,key,ca}.pem (serial %s); use --cert %s/cert.pem --key %s/key.pem\n", n, role, out, r.Serial, out, out)
			return nil
		})
	}
	var reason string
	remove := &cobra.Command{Use: "remove NAME", Short: "Remove an operator: revoke its certificates (never the last admin)", Args: exactArgs("NAME")}
	removeJSON := jsonFlag(remove)
	remove.Flags().StringVar(&reason, "reason", "operator removed", "why (kept in the audit log)")
	remove.RunE = func(cmd *cobra.Command, args []string) error {
		n, err := nameOf(identity.RoleOperator, args[0])
		if err != nil {
			return err
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			r, err := cl.RemoveOperator(ctx, n, reason)
			if err != nil {
				return err
			}
			if *removeJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operator %s removed: revoked certificates %v\n", r.Name, r.RevokedSerials)
			return nil
		})
	}
	var lf listFlags
	list := &cobra.Command{Use: "list", Short: "List operators and their roles"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			os, err := pages(&lf, cmd, url.Values{}, func(q url.Values) ([]api.Operator, error) { return cl.Operators(ctx, q) }, func(o api.Operator) string { return o.Name })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(os))
			}
			var rows [][]string
			for _, o := range os {
				rows = append(rows, []string{o.Name, o.Role, o.State, date(o.NotAfter)})
			}
			return table(cmd.OutOrStdout(), "NAME\tROLE\tSTATE\tEXPIRES", rows)
		})
	}
	who := &cobra.Command{Use: "whoami", Short: "Show the operator these credentials are, and its role"}
	whoJSON := jsonFlag(who)
	who.RunE = func(cmd *cobra.Command, _ []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			o, err := cl.WhoAmI(ctx)
			if err != nil {
				return err
			}
			if *whoJSON {
				return printJSON(cmd.OutOrStdout(), o)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operator/%s (%s)\n", o.Name, o.Role)
			return nil
		})
	}
	c.AddCommand(add, remove, list, who)
	return c
}

func groupsCmd() *cobra.Command {
	c, af := operatorCmd("groups", "Act on every device of a group")
	for _, a := range []struct{ use, short string }{
		{"revoke", "Revoke every device of a group (certificates on the CRL, live sessions closed)"},
		{"suspend", "Suspend every device of a group (reversible)"},
		{"resume", "Resume the suspended devices of a group"},
	} {
		action := a.use
		var reason, code string
		cmd := &cobra.Command{Use: action + " GROUP", Short: a.short, Args: exactArgs("GROUP")}
		js := jsonFlag(cmd)
		cmd.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log; required to revoke)")
		if action == "revoke" {
			cmd.Flags().StringVar(&code, "reason-code", "", "CRL reason: keyCompromise, cessationOfOperation, ... (default: from --reason)")
		}
		cmd.RunE = func(cmd *cobra.Command, args []string) error {
			if action == "revoke" && reason == "" {
				return usageError{errors.New("--reason is required: the audit log and the CRL keep it")}
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.GroupAction(ctx, args[0], action, api.StateChangeRequest{Reason: reason, ReasonCode: code})
				if err != nil {
					return err
				}
				if *js {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "group %s: %s %d device(s); %d live session(s) closed\n", r.Group, action, len(r.Devices), r.SessionsClosed)
				return nil
			})
		}
		c.AddCommand(cmd)
	}
	return c
}
