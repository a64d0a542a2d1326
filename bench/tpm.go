package bench

import (
	"context"
	"errors"
)

// EnrollTPMScenario measures the server side of TPM-attested enrollment.
func (e *Env) EnrollTPMScenario(ctx context.Context, res *Results, cfg Config, restart func(string) error, brokers map[string]*Broker) error {
	return errors.New("not implemented yet")
}
