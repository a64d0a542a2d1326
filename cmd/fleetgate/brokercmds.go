package main

import (
	"context"
	"fmt"
	"net/url"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/operator/client"
)

// The broker's sessions and retained messages.

// clientIDOf accepts a client ID as printed (sensor-1, backend:2) or an
// identity (device/sensor-1, service/backend).
func clientIDOf(s string) string {
	if _, name, ok := strings.Cut(s, "/"); ok && !strings.Contains(s, "://") {
		return name
	}
	if u, err := url.Parse(s); err == nil && u.Scheme == "spiffe" {
		parts := strings.Split(strings.Trim(u.Path, "/"), "/")
		return parts[len(parts)-1]
	}
	return s
}

func clientsCmd() *cobra.Command {
	c, af := operatorCmd("clients", "MQTT clients and sessions of the broker")
	var lf listFlags
	var online, role, group string
	list := &cobra.Command{Use: "list", Short: "List sessions: identity, remote address, since, subscriptions, queued messages"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.Flags().StringVar(&online, "online", "", "true: only live connections; false: only offline persistent sessions")
	list.Flags().StringVar(&role, "role", "", "only device, service or operator sessions")
	list.Flags().StringVar(&group, "group", "", "only devices of this group")
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		q := url.Values{}
		for k, v := range map[string]string{"online": online, "role": role, "group": group} {
			if v != "" {
				q.Set(k, v)
			}
		}
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			cs, err := pages(&lf, cmd, q, func(q url.Values) ([]api.Client, error) { return cl.Clients(ctx, q) }, func(c api.Client) string { return c.ClientID })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(cs))
			}
			var rows [][]string
			for _, c := range cs {
				rows = append(rows, []string{c.ClientID, c.Identity, yesNo(c.Online), or(c.Remote, "-"), date(c.Since),
					fmt.Sprint(len(c.Subscriptions)), fmt.Sprint(c.Queued)})
			}
			return table(cmd.OutOrStdout(), "CLIENT ID\tIDENTITY\tONLINE\tREMOTE\tSINCE\tSUBSCRIPTIONS\tQUEUED", rows)
		})
	}
	show := &cobra.Command{Use: "show CLIENT-ID", Short: "Show one session with its subscriptions", Args: exactArgs("CLIENT-ID")}
	showJSON := jsonFlag(show)
	show.RunE = func(cmd *cobra.Command, args []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			c, err := cl.ClientSession(ctx, clientIDOf(args[0]))
			if err != nil {
				return err
			}
			if *showJSON {
				return printJSON(cmd.OutOrStdout(), c)
			}
			rows := [][]string{{"identity", c.Identity}, {"online", yesNo(c.Online)}, {"remote", or(c.Remote, "-")}, {"since", date(c.Since)}, {"queued", fmt.Sprint(c.Queued)}}
			for _, s := range c.Subscriptions {
				rows = append(rows, []string{"subscription", s})
			}
			return table(cmd.OutOrStdout(), "client "+c.ClientID, rows)
		})
	}
	disc := &cobra.Command{Use: "disconnect CLIENT-ID", Short: "Close a client's live connection (MQTT 5: DISCONNECT 0x98); it may reconnect, its persistent session stays", Args: exactArgs("CLIENT-ID")}
	discJSON := jsonFlag(disc)
	disc.RunE = func(cmd *cobra.Command, args []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			r, err := cl.Disconnect(ctx, clientIDOf(args[0]))
			if err != nil {
				return err
			}
			if *discJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			if r.WasOnline {
				fmt.Fprintf(cmd.OutOrStdout(), "client %s: live connection closed\n", r.ClientID)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "client %s: was not connected (persistent session kept)\n", r.ClientID)
			}
			return nil
		})
	}
	c.AddCommand(list, show, disc)
	return c
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func retainedCmd() *cobra.Command {
	c, af := operatorCmd("retained", "Retained messages of the broker")
	var lf listFlags
	var filter string
	list := &cobra.Command{Use: "list", Short: "List retained messages (topic, QoS, size, publisher)"}
	listJSON := jsonFlag(list)
	lf.add(list)
	list.Flags().StringVar(&filter, "filter", "#", "topic filter")
	list.RunE = func(cmd *cobra.Command, _ []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			ms, err := pages(&lf, cmd, url.Values{"filter": {filter}}, func(q url.Values) ([]api.Retained, error) { return cl.Retained(ctx, q) }, func(m api.Retained) string { return m.Topic })
			if err != nil {
				return err
			}
			if *listJSON {
				return printJSON(cmd.OutOrStdout(), orEmpty(ms))
			}
			var rows [][]string
			for _, m := range ms {
				rows = append(rows, []string{m.Topic, fmt.Sprint(m.QoS), fmt.Sprint(m.Size), or(m.Publisher, "-")})
			}
			return table(cmd.OutOrStdout(), "TOPIC\tQOS\tBYTES\tPUBLISHER", rows)
		})
	}
	del := &cobra.Command{Use: "delete TOPIC", Short: "Delete the retained message of a topic", Args: exactArgs("TOPIC")}
	delJSON := jsonFlag(del)
	del.RunE = func(cmd *cobra.Command, args []string) error {
		return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			r, err := cl.DeleteRetained(ctx, args[0])
			if err != nil {
				return err
			}
			if *delJSON {
				return printJSON(cmd.OutOrStdout(), r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted the retained message of %s\n", args[0])
			return nil
		})
	}
	c.AddCommand(list, del)
	return c
}
