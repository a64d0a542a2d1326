package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
)

// subjectFromRegistry fills a device subject's group, tags and attestation
// method from the server's registry (policy explain --from-registry).
func subjectFromRegistry(cmd *cobra.Command, af *adminFlags, s *acl.Subject) error {
	if s.Role != identity.RoleDevice {
		return nil
	}
	return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
		d, err := cl.Device(ctx, s.ID)
		if err != nil {
			return err
		}
		s.Group, s.Attestation = d.Group, d.AttestationMethod
		s.Tags = map[string]string{}
		for k, v := range d.Tags {
			s.Tags[k] = v
		}
		return nil
	})
}

// explainMisses prints the subject's attributes a rule may depend on, and
// each rule that covers the topic but missed the subject, with why.
func explainMisses(w io.Writer, p *acl.Policy, s acl.Subject, pub, sub string, retain bool) {
	topic := pub
	if topic == "" {
		topic = sub
	}
	if s.Role == identity.RoleDevice {
		fmt.Fprintf(w, "  subject: group %s, attestation %s\n", orNone(s.Group), orNone(s.Attestation))
	}
	for _, m := range p.Misses(s, topic, pub != "", retain) {
		fmt.Fprintf(w, "  rule %q (%s) missed: %s\n", m.Rule.Name, m.Rule.Describe(), m.Reason)
	}
}

func orNone(v string) string {
	if v == "" {
		return "(none)"
	}
	return v
}
