package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

func policyCmd() *cobra.Command {
	c := &cobra.Command{Use: "policy", Short: "The broker's topic policy"}
	af := &adminFlags{}
	var reloadJSON *bool
	reload := &cobra.Command{
		Use:   "reload",
		Short: "Reload the policy file in the running server (a bad file is refused; the old policy stays)",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				res, err := cl.ReloadPolicyFile(ctx)
				if err != nil {
					return err
				}
				if *reloadJSON {
					return printJSON(cmd.OutOrStdout(), res)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "policy reloaded from %s: %d rules of the file (%d compiled) in force\n", res.File, res.FileRules, res.Rules)
				return nil
			})
		},
	}
	show := &cobra.Command{
		Use:   "default",
		Short: "Print the built-in default policy (a starting point for policy.yaml)",
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprint(cmd.OutOrStdout(), acl.DefaultFile) },
	}
	var file, ident, group, pub, sub, attestation string
	var fromRegistry bool
	var tags []string
	var retain bool
	explain := &cobra.Command{
		Use:   "explain",
		Short: "Say whether an identity may publish or subscribe, and which rule decides",
		Example: `  fleetgate policy explain --identity spiffe://fleetgate.local/device/sensor-1 --group lab --publish devices/sensor-1/telemetry/t
  fleetgate policy explain --identity spiffe://fleetgate.local/service/backend --subscribe 'devices/#'
  fleetgate policy explain --identity spiffe://fleetgate.local/device/sensor-1 --attestation token --publish devices/sensor-1/firmware/v2
  fleetgate policy explain --from-registry --identity spiffe://fleetgate.local/device/sensor-1 --publish devices/sensor-1/firmware/v2`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (pub == "") == (sub == "") {
				return errors.New("give exactly one of --publish TOPIC or --subscribe FILTER")
			}
			path := file
			if path == "" {
				path = server.Layout{Dir: af.dataDir}.PolicyPath("")
			}
			p, err := server.LoadPolicy(path)
			if err != nil {
				return err
			}
			u, err := url.Parse(ident)
			if err != nil {
				return fmt.Errorf("--identity: %w", err)
			}
			id, err := identity.ParseURI(u, u.Host)
			if err != nil {
				return fmt.Errorf("--identity: %w", err)
			}
			s := acl.Subject{Role: id.Role, ID: id.Name, Group: group, Tags: map[string]string{}, Attestation: attestation}
			if fromRegistry {
				if err := subjectFromRegistry(cmd, af, &s); err != nil {
					return err
				}
			}
			for _, t := range tags {
				k, v, ok := strings.Cut(t, "=")
				if !ok {
					return fmt.Errorf("--tag %q: want key=value", t)
				}
				s.Tags[k] = v
			}
			var d acl.Decision
			what := ""
			if pub != "" {
				d, what = p.CheckPublish(s, pub, retain), "publish "+pub
			} else {
				d, what = p.CheckSubscribe(s, sub), "subscribe "+sub
			}
			src := path
			if src == "" {
				src = "built-in default policy"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s: %s  [%s]\n", id, what, p.Explain(d), src)
			explainMisses(cmd.OutOrStdout(), p, s, pub, sub, retain)
			if !d.Allowed {
				return errDenied
			}
			return nil
		},
	}
	explain.Flags().StringVar(&file, "policy", "", "policy file (default: <data-dir>/policy.yaml, else built-in)")
	explain.Flags().StringVar(&ident, "identity", "", "spiffe://<trust-domain>/<role>/<name> (required)")
	explain.Flags().StringVar(&group, "group", "", "the device's group")
	explain.Flags().StringSliceVar(&tags, "tag", nil, "a device tag key=value (repeatable)")
	explain.Flags().StringVar(&pub, "publish", "", "topic to publish to")
	explain.Flags().BoolVar(&retain, "retain", false, "with --publish: the retain flag")
	explain.Flags().StringVar(&sub, "subscribe", "", "filter to subscribe to")
	explain.Flags().StringVar(&attestation, "attestation", "", "the device's attestation method (tpm or token)")
	explain.Flags().BoolVar(&fromRegistry, "from-registry", false, "read the device's group, tags and attestation method from the server (admin API)")
	_ = explain.MarkFlagRequired("identity")
	inForce := &cobra.Command{Use: "show", Short: "Show the policy in force on the server: its file, rule counts and text"}
	inForceJSON := jsonFlag(inForce)
	inForce.RunE = func(cmd *cobra.Command, _ []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			p, err := cl.Policy(ctx)
			if err != nil {
				return err
			}
			if *inForceJSON {
				return printJSON(cmd.OutOrStdout(), p)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "# in force: %s, %d rules of the file (%d compiled)\n", p.File, p.FileRules, p.Rules)
			fmt.Fprint(cmd.OutOrStdout(), p.YAML)
			return nil
		})
	}
	// Only the commands that call the server have its flags (explain reads
	// the data directory's policy.yaml); default is local.
	af.add(reload)
	af.add(inForce)
	af.add(explain)
	reloadJSON = jsonFlag(reload)
	c.AddCommand(reload, show, explain, inForce)
	return c
}

// errDenied makes `policy explain` exit 1 on deny, for scripts.
var errDenied = errors.New("denied")
