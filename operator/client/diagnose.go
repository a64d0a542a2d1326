package client

import (
	"context"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
)

// Diagnose asks the server why its broker would refuse a certificate (the
// broker's own checks: `fleetgate diagnose`).
func (c *Client) Diagnose(ctx context.Context, req api.DiagnoseRequest) (*api.DiagnoseReport, error) {
	var out api.DiagnoseReport
	return &out, c.do(ctx, http.MethodPost, api.PathAdminDiagnose, req, &out)
}
