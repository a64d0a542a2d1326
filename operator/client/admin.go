package client

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/fleetgate/fleetgate/api"
)

// Lists take a query (filters, limit, after) and return one page; Pages
// reads them all.

// List fetches one page of the list at path with query q into out.
func (c *Client) List(ctx context.Context, path string, q url.Values, out any) error {
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	return c.do(ctx, http.MethodGet, path, nil, out)
}

// DevicesPage lists devices with filters (group, state, online, limit, after).
func (c *Client) DevicesPage(ctx context.Context, q url.Values) ([]api.Device, error) {
	var out []api.Device
	return out, c.List(ctx, api.PathAdminDevices, q, &out)
}

// Tokens lists bootstrap tokens (state, device, group, limit, after).
func (c *Client) Tokens(ctx context.Context, q url.Values) ([]api.Token, error) {
	var out []api.Token
	return out, c.List(ctx, api.PathAdminTokens, q, &out)
}

// RevokeToken ends an unused token.
func (c *Client) RevokeToken(ctx context.Context, id string) (*api.Token, error) {
	var out api.Token
	return &out, c.do(ctx, http.MethodPost, api.PathAdminToken+url.PathEscape(id)+"/revoke", struct{}{}, &out)
}

// Services lists services (state, limit, after).
func (c *Client) Services(ctx context.Context, q url.Values) ([]api.Service, error) {
	var out []api.Service
	return out, c.List(ctx, api.PathAdminServices, q, &out)
}

// Service shows one service with its certificates.
func (c *Client) Service(ctx context.Context, name string) (*api.Service, error) {
	var out api.Service
	return &out, c.do(ctx, http.MethodGet, api.PathAdminService+url.PathEscape(name), nil, &out)
}

// RenewService issues a new certificate for an existing service.
func (c *Client) RenewService(ctx context.Context, name string, req api.ServiceRenewRequest) (*api.ServiceIssueResponse, error) {
	var out api.ServiceIssueResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminService+url.PathEscape(name)+"/renew", req, &out)
}

// RevokeService revokes every valid certificate of a service.
func (c *Client) RevokeService(ctx context.Context, name string, req api.StateChangeRequest) (*api.RemoveResponse, error) {
	var out api.RemoveResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminService+url.PathEscape(name)+"/revoke", req, &out)
}

// Operators lists operators.
func (c *Client) Operators(ctx context.Context, q url.Values) ([]api.Operator, error) {
	var out []api.Operator
	return out, c.List(ctx, api.PathAdminOperators, q, &out)
}

// AddOperator adds an operator and issues its certificate.
func (c *Client) AddOperator(ctx context.Context, req api.OperatorAddRequest) (*api.ServiceIssueResponse, error) {
	var out api.ServiceIssueResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminOperators, req, &out)
}

// RemoveOperator revokes an operator's certificates (never the last admin).
func (c *Client) RemoveOperator(ctx context.Context, name, reason string) (*api.RemoveResponse, error) {
	var out api.RemoveResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminOperator+url.PathEscape(name)+"/remove", api.StateChangeRequest{Reason: reason}, &out)
}

// WhoAmI returns the calling operator.
func (c *Client) WhoAmI(ctx context.Context) (*api.Operator, error) {
	var out api.Operator
	return &out, c.do(ctx, http.MethodGet, api.PathAdminWhoAmI, nil, &out)
}

// Clients lists the broker's sessions (online, role, group, limit, after).
func (c *Client) Clients(ctx context.Context, q url.Values) ([]api.Client, error) {
	var out []api.Client
	return out, c.List(ctx, api.PathAdminClients, q, &out)
}

// ClientSession shows one session.
func (c *Client) ClientSession(ctx context.Context, id string) (*api.Client, error) {
	var out api.Client
	return &out, c.do(ctx, http.MethodGet, api.PathAdminClient+url.PathEscape(id), nil, &out)
}

// Disconnect closes a client's live connection.
func (c *Client) Disconnect(ctx context.Context, id string) (*api.DisconnectResponse, error) {
	var out api.DisconnectResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminClient+url.PathEscape(id)+"/disconnect", struct{}{}, &out)
}

// Retained lists retained messages (filter, limit, after).
func (c *Client) Retained(ctx context.Context, q url.Values) ([]api.Retained, error) {
	var out []api.Retained
	return out, c.List(ctx, api.PathAdminRetained, q, &out)
}

// DeleteRetained deletes the retained message of a topic.
func (c *Client) DeleteRetained(ctx context.Context, topic string) (*api.RetainedDeleteResponse, error) {
	var out api.RetainedDeleteResponse
	return &out, c.do(ctx, http.MethodDelete, api.PathAdminRetained+"?"+url.Values{"topic": {topic}}.Encode(), nil, &out)
}

// Policy returns the policy in force on the server.
func (c *Client) Policy(ctx context.Context) (*api.PolicyShowResponse, error) {
	var out api.PolicyShowResponse
	return &out, c.do(ctx, http.MethodGet, api.PathAdminPolicy, nil, &out)
}

// GroupAction revokes, suspends or resumes every device of a group.
func (c *Client) GroupAction(ctx context.Context, group, action string, req api.StateChangeRequest) (*api.GroupActionResponse, error) {
	if action != "revoke" && action != "suspend" && action != "resume" {
		return nil, fmt.Errorf("group action %q", action)
	}
	var out api.GroupActionResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminGroup+url.PathEscape(group)+"/"+action, req, &out)
}

// DeviceActionReq is DeviceAction with a full request (reason code).
func (c *Client) DeviceActionReq(ctx context.Context, id, action string, req api.StateChangeRequest) (*api.StateChangeResponse, error) {
	var out api.StateChangeResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminDeviceAction+url.PathEscape(id)+"/"+action, req, &out)
}

// RevokeCertificateReq is RevokeCertificate with a full request.
func (c *Client) RevokeCertificateReq(ctx context.Context, serial string, req api.StateChangeRequest) error {
	return c.do(ctx, http.MethodPost, api.PathAdminCertificates+url.PathEscape(serial)+"/revoke", req, nil)
}
