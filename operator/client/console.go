package client

import (
	"context"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
)

// ConsoleLogin mints a one-time sign-in link of the web console for the
// client's operator certificate.
func (c *Client) ConsoleLogin(ctx context.Context) (*api.ConsoleLoginResponse, error) {
	var out api.ConsoleLoginResponse
	if err := c.do(ctx, http.MethodPost, api.PathAdminConsoleLogin, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
