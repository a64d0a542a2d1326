package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/operator/client"
)

func consoleCmd() *cobra.Command {
	c, af := operatorCmd("console", "The web console (serve with --console-addr)")
	login := &cobra.Command{
		Use:   "login",
		Short: "Print a one-time sign-in link of the web console for your operator certificate",
		Long: `Asks the admin API, with the operator certificate, for a sign-in link of the
web console. The link works once and only for a short time (2 minutes); it
opens a browser session of 30 minutes as the operator who asked.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				res, err := cl.ConsoleLogin(ctx)
				var ae *api.Error
				if errors.As(err, &ae) && ae.Status == http.StatusNotFound {
					return errors.New("this server runs no web console (serve it with --console-addr): " + err.Error())
				}
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), res.URL)
				fmt.Fprintf(cmd.ErrOrStderr(), "one-time link for %s, valid until %s (%s)\n", res.Operator,
					res.ExpiresAt.Format(time.RFC3339), time.Until(res.ExpiresAt).Round(time.Second))
				return nil
			})
		},
	}
	c.AddCommand(login)
	return c
}
