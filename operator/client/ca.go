package client

import (
	"context"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
)

// CAStatus lists the issuing CAs with the active devices on each.
func (c *Client) CAStatus(ctx context.Context) (*api.CAStatus, error) {
	var out api.CAStatus
	return &out, c.do(ctx, http.MethodGet, api.PathAdminCA, nil, &out)
}

// CARotate creates a new current issuing CA, or with the root offline a
// pending one whose CSR the answer carries.
func (c *Client) CARotate(ctx context.Context) (*api.CAChangeResponse, error) {
	var out api.CAChangeResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminCARotate, struct{}{}, &out)
}

// CAImport installs a pending issuing CA's certificate signed by the root.
func (c *Client) CAImport(ctx context.Context, certPEM string) (*api.CAChangeResponse, error) {
	var out api.CAChangeResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminCAImport, api.CAImportRequest{CertificatePEM: certPEM}, &out)
}

// CARetire stops trusting an issuing CA (409 ca_in_use while active
// devices hold its certificates, unless force).
func (c *Client) CARetire(ctx context.Context, id string, force bool) (*api.CARetireResponse, error) {
	var out api.CARetireResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminCARetire, api.CARetireRequest{ID: id, Force: force}, &out)
}
