package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
)

// addAdminCommands adds the operator CLI's further command groups.
func addAdminCommands(r *cobra.Command) {
	r.AddCommand(operatorsCmd(), groupsCmd(), clientsCmd(), retainedCmd())
}

func devicesCmd() *cobra.Command {
	c, af := operatorCmd("devices", "Devices in the registry")
	var lf listFlags
	var group, state, online string
	list := &cobra.Command{Use: "list", Short: "List devices (filters: --group, --state, --online)"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.Flags().StringVar(&group, "group", "", "only this group")
	list.Flags().StringVar(&state, "state", "", "only registered, active, suspended or revoked devices")
	list.Flags().StringVar(&online, "online", "", "true: only devices with a live session; false: only without")
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		q := url.Values{}
		for k, v := range map[string]string{"group": group, "state": state, "online": online} {
			if v != "" {
				q.Set(k, v)
			}
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			ds, err := pages(&lf, cmd, q, func(q url.Values) ([]api.Device, error) { return cl.DevicesPage(ctx, q) }, func(d api.Device) string { return d.ID })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(ds))
			}
			var rows [][]string
			for _, d := range ds {
				rows = append(rows, []string{d.ID, d.Group, d.State, yesNo(d.Online), d.AttestationMethod, d.Serial, d.NotAfter.Format(time.DateOnly)})
			}
			return table(cmd.OutOrStdout(), "ID\tGROUP\tSTATE\tONLINE\tMETHOD\tSERIAL\tEXPIRES", rows)
		})
	}
	show := &cobra.Command{Use: "show ID", Short: "Show one device", Args: exactArgs("ID")}
	showJSON := jsonFlag(show)
	show.RunE = func(cmd *cobra.Command, args []string) error {
		id, err := nameOf(identity.RoleDevice, args[0])
		if err != nil {
			return err
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			d, err := cl.Device(ctx, id)
			if err != nil {
				return err
			}
			if *showJSON {
				return printJSON(cmd.OutOrStdout(), d)
			}
			rows := [][]string{{"group", d.Group}, {"state", d.State}, {"online", yesNo(d.Online)}, {"method", d.AttestationMethod},
				{"serial", d.Serial}, {"expires", date(d.NotAfter)}, {"created", date(d.CreatedAt)}}
			keys := make([]string, 0, len(d.Tags))
			for k := range d.Tags {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			for _, k := range keys {
				rows = append(rows, []string{"tag " + k, d.Tags[k]})
			}
			return table(cmd.OutOrStdout(), "device/"+d.ID, rows)
		})
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
that shows the next page is printed on stderr. --all reads every page.
'audit export' writes the whole log as JSON lines, oldest first.`,
	}
	js := jsonFlag(c)
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		dev := device
		if dev != "" {
			var err error
			if dev, err = nameOf(identity.RoleDevice, dev); err != nil {
				return err
			}
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			var recs []api.AuditRecord
			for {
				p, err := cl.AuditPage(ctx, dev, limit, cursor)
				if err != nil {
					return err
				}
				recs = append(recs, p.Records...)
				cursor = p.Next
				if !all || cursor == "" {
					break
				}
			}
			if *js {
				if err := printJSON(cmd.OutOrStdout(), orEmpty(recs)); err != nil {
					return err
				}
			} else {
				var rows [][]string
				for _, a := range recs {
					rows = append(rows, []string{fmt.Sprint(a.Seq), a.Time.Format(time.RFC3339), a.Actor, a.Action, a.DeviceID, a.Outcome, a.Reason})
				}
				if err := table(cmd.OutOrStdout(), "SEQ\tTIME\tACTOR\tACTION\tDEVICE\tOUTCOME\tREASON", rows); err != nil {
					return err
				}
			}
			if cursor != "" {
				next := fmt.Sprintf("fleetgate audit --limit %d --cursor %s", limit, cursor)
				if device != "" {
					next += " --device " + dev
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "older records: %s\n", next)
			}
			return nil
		})
	}
	af.add(c)
	c.Flags().StringVar(&device, "device", "", "only this device (read through the registry's per-device index)")
	c.Flags().IntVar(&limit, "limit", 50, fmt.Sprintf("records per page (at most %d)", api.MaxAuditLimit))
	c.Flags().StringVar(&cursor, "cursor", "", "continue after a previous page (printed by it)")
	c.Flags().BoolVar(&all, "all", false, "read every page")

	var exDevice string
	export := &cobra.Command{
		Use:   "export",
		Short: "Write the whole audit log as JSON lines (one record per line), oldest first",
		RunE: func(cmd *cobra.Command, _ []string) error {
			dev := exDevice
			if dev != "" {
				var err error
				if dev, err = nameOf(identity.RoleDevice, dev); err != nil {
					return err
				}
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				recs, err := cl.Audit(ctx, dev, 0)
				if err != nil {
					return err
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				for i := len(recs) - 1; i >= 0; i-- {
					if err := enc.Encode(recs[i]); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
	export.Flags().StringVar(&exDevice, "device", "", "only this device")
	c.AddCommand(export)
	return c
}
