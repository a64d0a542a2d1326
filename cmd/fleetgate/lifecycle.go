package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
)

// addLifecycleCommands adds revoke, suspend and resume to the devices
// command.
func addLifecycleCommands(devices *cobra.Command, af *adminFlags) {
	for _, a := range []struct{ use, short string }{
		{"revoke", "Revoke a device for good: its certificates go on the CRL, its live session is closed, it cannot reconnect, renew or re-enroll"},
		{"suspend", "Suspend a device (reversible): its session is closed and it is refused until resumed"},
		{"resume", "Resume a suspended device"},
	} {
		action := a.use
		var reason, code string
		c := &cobra.Command{
			Use:   action + " ID",
			Short: a.short,
			Args:  exactArgs("ID"),
		}
		js := jsonFlag(c)
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if action == "revoke" && reason == "" {
				return usageError{fmt.Errorf("--reason is required: the audit log and the CRL keep it")}
			}
			id, err := nameOf(identity.RoleDevice, args[0])
			if err != nil {
				return err
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.DeviceActionReq(ctx, id, action, api.StateChangeRequest{Reason: reason, ReasonCode: code})
				if err != nil {
					return err
				}
				if *js {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "device %s: %s", r.DeviceID, r.State)
				if len(r.RevokedSerials) > 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "; revoked certificates %v", r.RevokedSerials)
				}
				switch {
				case action == "resume":
				case r.SessionsClosed:
					fmt.Fprint(cmd.OutOrStdout(), "; live session closed")
				case r.WasOnline:
					fmt.Fprint(cmd.OutOrStdout(), "; live session NOT closed (not in this server's broker)")
				default:
					fmt.Fprint(cmd.OutOrStdout(), "; no live session")
				}
				fmt.Fprintln(cmd.OutOrStdout())
				return nil
			})
		}
		c.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)")
		if action == "revoke" {
			c.Flags().StringVar(&code, "reason-code", "", "CRL reason: keyCompromise, cessationOfOperation, superseded, affiliationChanged, privilegeWithdrawn (default: from --reason, e.g. 'stolen' is keyCompromise)")
		}
		devices.AddCommand(c)
	}
	devices.AddCommand(setCmd(af))
}

// setCmd changes a device's group and tags.
func setCmd(af *adminFlags) *cobra.Command {
	var group string
	var tags []string
	var clear bool
	var setJSON *bool
	c := &cobra.Command{
		Use:   "set ID",
		Short: "Change a device's group and tags (the broker applies them at the device's next publish or subscribe)",
		Args:  exactArgs("ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := nameOf(identity.RoleDevice, args[0])
			if err != nil {
				return err
			}
			req := api.DeviceUpdateRequest{Group: group}
			if len(tags) > 0 || clear {
				req.Tags = map[string]string{}
				for _, t := range tags {
					k, v, ok := strings.Cut(t, "=")
					if !ok {
						return fmt.Errorf("--tag %q: want key=value", t)
					}
					req.Tags[k] = v
				}
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				d, err := cl.UpdateDevice(ctx, id, req)
				if err != nil {
					return err
				}
				if *setJSON {
					return printJSON(cmd.OutOrStdout(), d)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "device %s: group %s, tags %v\n", d.ID, d.Group, d.Tags)
				return nil
			})
		},
	}
	c.Flags().StringVar(&group, "group", "", "new group")
	c.Flags().StringSliceVar(&tags, "tag", nil, "tag key=value (repeatable; replaces all tags)")
	c.Flags().BoolVar(&clear, "clear-tags", false, "remove all tags")
	setJSON = jsonFlag(c)
	return c
}

// certificatesCmd revokes single certificates.
func certificatesCmd() *cobra.Command {
	var af adminFlags
	var certJSON *bool
	var reason, code string
	certs := &cobra.Command{Use: "certificates", Short: "Single certificates"}
	revoke := &cobra.Command{
		Use:   "revoke SERIAL",
		Short: "Revoke one certificate (hex serial), e.g. a service's",
		Args:  exactArgs("SERIAL"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if reason == "" {
				return usageError{fmt.Errorf("--reason is required")}
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if err := cl.RevokeCertificateReq(ctx, args[0], api.StateChangeRequest{Reason: reason, ReasonCode: code}); err != nil {
					return err
				}
				if *certJSON {
					return printJSON(cmd.OutOrStdout(), api.StateChangeResponse{RevokedSerials: []string{args[0]}, SessionsClosed: true})
				}
				fmt.Fprintf(cmd.OutOrStdout(), "certificate %s revoked\n", args[0])
				return nil
			})
		},
	}
	revoke.Flags().StringVar(&reason, "reason", "", "why (kept in the audit log)")
	revoke.Flags().StringVar(&code, "reason-code", "", "CRL reason: keyCompromise, cessationOfOperation, superseded, ... (default: from --reason)")
	certJSON = jsonFlag(revoke)
	certs.AddCommand(revoke)
	af.add(certs)
	return certs
}
