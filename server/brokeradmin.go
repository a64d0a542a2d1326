package server

import (
	"os"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker/acl"
)

// The broker as the operator API's clients, retained and policy commands
// see it (operator.Broker).

func (p *brokerPolicy) Online(name string) int           { return p.b.Online(name) }
func (p *brokerPolicy) Clients() []api.Client            { return p.b.Clients() }
func (p *brokerPolicy) Retained(f string) []api.Retained { return p.b.Retained(f) }
func (p *brokerPolicy) DeleteRetained(topic string) int  { return p.b.DeleteRetained(topic) }

func (p *brokerPolicy) Disconnect(clientID string) (bool, bool) { return p.b.Disconnect(clientID) }

// inForce records the policy file now in force (at start and after each
// accepted reload) with its text, for Policy.
func (p *brokerPolicy) inForce(path string, fileRules, rules int) {
	res := api.PolicyShowResponse{File: policyName(path), FileRules: fileRules, Rules: rules, YAML: acl.DefaultFile}
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			res.YAML = "# " + err.Error() + "\n"
		} else {
			res.YAML = string(b)
		}
	}
	p.shown.Store(&res)
}

// Policy returns the policy in force.
func (p *brokerPolicy) Policy() api.PolicyShowResponse {
	if r := p.shown.Load(); r != nil {
		return *r
	}
	return api.PolicyShowResponse{File: "unknown", Rules: len(p.b.Policy().Rules())}
}
