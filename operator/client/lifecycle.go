package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/fleetgate/fleetgate/api"
)

// DeviceAction is "revoke", "suspend" or "resume".
func (c *Client) DeviceAction(ctx context.Context, id, action, reason string) (*api.StateChangeResponse, error) {
	var out api.StateChangeResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminDeviceAction+url.PathEscape(id)+"/"+action, api.StateChangeRequest{Reason: reason}, &out)
}

// RevokeCertificate revokes one certificate by serial (hex).
func (c *Client) RevokeCertificate(ctx context.Context, serial, reason string) error {
	return c.do(ctx, http.MethodPost, api.PathAdminCertificates+url.PathEscape(serial)+"/revoke", api.StateChangeRequest{Reason: reason}, nil)
}

// ReloadPolicy reloads the broker's policy file and returns the number of
// compiled rules in force.
func (c *Client) ReloadPolicy(ctx context.Context) (int, error) {
	out, err := c.ReloadPolicyFile(ctx)
	return out.Rules, err
}

// ReloadPolicyFile reloads the broker's policy file and reports which file
// is in force and its rule counts.
func (c *Client) ReloadPolicyFile(ctx context.Context) (api.PolicyReloadResponse, error) {
	var out api.PolicyReloadResponse
	err := c.do(ctx, http.MethodPost, api.PathAdminPolicyReload, struct{}{}, &out)
	return out, err
}

// UpdateDevice changes a device's group and/or tags.
func (c *Client) UpdateDevice(ctx context.Context, id string, req api.DeviceUpdateRequest) (*api.Device, error) {
	var out api.Device
	return &out, c.do(ctx, http.MethodPatch, api.PathAdminDevices+"/"+url.PathEscape(id), req, &out)
}
