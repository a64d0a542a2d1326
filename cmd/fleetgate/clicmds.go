package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
)

// One behaviour for every command: unknown subcommands and stray
// arguments are usage errors (exit 2), --json prints what the table
// shows, identities are accepted as the tool prints them.

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// exitCode is the exit status of err: 0, 2 for a usage error, else 1.
func exitCode(err error) int {
	var u usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &u):
		return 2
	}
	return 1
}

// strict makes every command of the tree refuse what it does not know:
// a group refuses an unknown subcommand, a command whose Use names no
// argument refuses any, and flag errors are usage errors.
func strict(c *cobra.Command) {
	c.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	wrapArgs(c)
	for _, sub := range c.Commands() {
		strict(sub)
	}
}

func wrapArgs(c *cobra.Command) {
	switch {
	case c.HasSubCommands() && !c.Runnable():
		c.Args = func(c *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q for %q (see %s --help)", args[0], c.CommandPath(), c.CommandPath())}
			}
			return nil
		}
		c.RunE = func(c *cobra.Command, _ []string) error {
			c.SetOut(c.ErrOrStderr())
			_ = c.Usage()
			return usageError{fmt.Errorf("%s needs a subcommand: %s", c.CommandPath(), subNames(c))}
		}
	case c.Args == nil && len(strings.Fields(c.Use)) == 1:
		c.Args = cobra.NoArgs
	}
	if inner := c.Args; inner != nil {
		c.Args = func(c *cobra.Command, args []string) error {
			if err := inner(c, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
}

func subNames(c *cobra.Command) string {
	var n []string
	for _, s := range c.Commands() {
		if s.IsAvailableCommand() {
			n = append(n, s.Name())
		}
	}
	return strings.Join(n, ", ")
}

// exactArgs is cobra.ExactArgs naming what is missing.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != len(names) {
			return fmt.Errorf("%s takes %d argument(s): %s (got %d)", c.CommandPath(), len(names), strings.Join(names, " "), len(args))
		}
		return nil
	}
}

// nameOf accepts a name as the tool prints it — sensor-1, device/sensor-1
// or spiffe://<td>/device/sensor-1 — and returns the bare name; a role
// prefix must be role's.
func nameOf(role identity.Role, s string) (string, error) {
	if u, err := url.Parse(s); err == nil && u.Scheme == "spiffe" {
		s = strings.TrimPrefix(u.Path, "/")
	}
	if r, name, ok := strings.Cut(s, "/"); ok {
		if identity.Role(r) != role {
			return "", usageError{fmt.Errorf("%q is not a %s identity", s, role)}
		}
		s = name
	}
	if err := identity.ValidateName(s); err != nil {
		return "", usageError{err}
	}
	return s, nil
}

// jsonFlag adds --json to c.
func jsonFlag(c *cobra.Command) *bool {
	var b bool
	c.Flags().BoolVar(&b, "json", false, "print JSON")
	return &b
}

// printJSON prints v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table prints rows under a header, tab-separated columns aligned.
func table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// listFlags are the paging flags of every list: --limit, --after, --all.
type listFlags struct {
	limit int
	after string
	all   bool
}

func (l *listFlags) add(c *cobra.Command) {
	c.Flags().IntVar(&l.limit, "limit", 100, fmt.Sprintf("items per page (at most %d)", api.MaxListLimit))
	c.Flags().StringVar(&l.after, "after", "", "start after this key (the last one of the previous page)")
	c.Flags().BoolVar(&l.all, "all", false, "read every page")
}

// pages reads pages of a list (fetch with the query q plus limit and
// after) until one is short or, without --all, after the first; key is an
// item's sort key. It prints on stderr how to get the next page.
func pages[T any](l *listFlags, c *cobra.Command, q url.Values, fetch func(url.Values) ([]T, error), key func(T) string) ([]T, error) {
	if l.limit < 1 {
		return nil, usageError{errors.New("--limit must be positive")}
	}
	var out []T
	after := l.after
	for {
		q.Set("limit", fmt.Sprint(l.limit))
		q.Del("after")
		if after != "" {
			q.Set("after", after)
		}
		p, err := fetch(q)
		if err != nil {
			return out, err
		}
		out = append(out, p...)
		if len(p) < l.limit {
			return out, nil
		}
		after = key(p[len(p)-1])
		if !l.all {
			fmt.Fprintf(c.ErrOrStderr(), "more: %s --after %s (or --all)\n", c.CommandPath(), after)
			return out, nil
		}
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
