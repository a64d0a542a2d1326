package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/api"
)

// Scenario 7: enrollment through bootstrap tokens (the TPM path:
// enroll_tpm.go).

// EnrollTokens enrolls n new devices (token path, software keys, one HTTPS
// connection per enrollment as a device does) with `workers` concurrent
// clients; tokens are minted before the measurement.
func (e *Env) EnrollTokens(ctx context.Context, b *Broker, rep, n, workers int) (Values, error) {
	admin, err := e.Admin(b)
	if err != nil {
		return nil, err
	}
	toks := make([]string, n)
	ids := make([]string, n)
	if err := parallel(ctx, n, 8, func(i int) error {
		ids[i] = fmt.Sprintf("enroll-%d-%05d", rep, i)
		t, err := admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: ids[i], Group: "bench", TTL: time.Hour})
		if err != nil {
			return err
		}
		toks[i] = t.Token
		return nil
	}); err != nil {
		return nil, fmt.Errorf("tokens: %w", err)
	}
	url := "https://" + b.API
	meter, err := startCPU(b.PID)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := parallel(ctx, n, workers, func(i int) error {
		return enrollWithToken(ctx, ids[i], filepath.Join(e.Work, "enroll", ids[i]), url, e.Roots, toks[i])
	}); err != nil {
		return nil, err
	}
	wall := time.Since(start)
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	return Values{
		"enrollments/s":        float64(n) / wall.Seconds(),
		"server CPU µs/enroll": us(cpu) / float64(n),
		"per core /s (CPU)":    float64(n) / cpu.Seconds(),
	}, nil
}
