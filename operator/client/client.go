// Package client is the client of the operator API (operator/): the CLI's
// operator commands call the server through it, over mTLS with an operator
// certificate. An error answer is an *api.Error (errors.As).
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// Client calls the admin API.
type Client struct {
	base string
	http *http.Client
}

// Credentials name the operator certificate, its key and the CA to trust.
type Credentials struct {
	CertFile, KeyFile, CAFile string
}

// FromDataDir returns the credentials `fleetgate init` wrote in dataDir.
func FromDataDir(dataDir string) Credentials {
	return Credentials{
		CertFile: filepath.Join(dataDir, ca.OperatorCertFile),
		KeyFile:  filepath.Join(dataDir, ca.OperatorKeyFile),
		CAFile:   filepath.Join(dataDir, ca.RootCertFile),
	}
}

// New returns a client of the server at baseURL (https://host:port).
func New(baseURL string, c Credentials) (*Client, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("operator certificate: %w", err)
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("CA file %s: no certificate", c.CAFile)
	}
	return &Client{base: baseURL, http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}}, nil
}

// answerError is the error of an error answer e, as the CLI prints it.
func answerError(e *api.Error) error { return fmt.Errorf("server said %w", e) }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return answerError(api.ReadError(resp.StatusCode, b))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// CreateToken mints a bootstrap token.
func (c *Client) CreateToken(ctx context.Context, req api.TokenCreateRequest) (*api.TokenCreateResponse, error) {
	var out api.TokenCreateResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminTokens, req, &out)
}

// IssueService issues a service certificate.
func (c *Client) IssueService(ctx context.Context, req api.ServiceIssueRequest) (*api.ServiceIssueResponse, error) {
	var out api.ServiceIssueResponse
	return &out, c.do(ctx, http.MethodPost, api.PathAdminServices, req, &out)
}

// Devices lists devices.
func (c *Client) Devices(ctx context.Context) ([]api.Device, error) {
	var out []api.Device
	return out, c.do(ctx, http.MethodGet, api.PathAdminDevices, nil, &out)
}

// Device shows one device.
func (c *Client) Device(ctx context.Context, id string) (*api.Device, error) {
	var out api.Device
	return &out, c.do(ctx, http.MethodGet, api.PathAdminDevices+"/"+url.PathEscape(id), nil, &out)
}

// AuditPage returns one page of the audit log, newest first: at most limit
// records (0: the server's default) older than cursor (empty: the newest),
// optionally of one device. Its Next is the cursor of the following page.
func (c *Client) AuditPage(ctx context.Context, device string, limit int, cursor string) (*api.AuditPage, error) {
	q := url.Values{}
	if device != "" {
		q.Set("device", device)
	}
	if limit > 0 {
		q.Set("limit", fmt.Sprint(limit))
	}
	if cursor != "" {
		q.Set("cursor", cursor)
	}
	var out api.AuditPage
	return &out, c.do(ctx, http.MethodGet, api.PathAdminAudit+"?"+q.Encode(), nil, &out)
}

// Audit returns the newest limit audit records (0: all), newest first,
// optionally of one device, reading as many pages as that takes.
func (c *Client) Audit(ctx context.Context, device string, limit int) ([]api.AuditRecord, error) {
	var out []api.AuditRecord
	cursor := ""
	for {
		n := api.MaxAuditLimit
		if limit > 0 {
			n = min(n, limit-len(out))
		}
		p, err := c.AuditPage(ctx, device, n, cursor)
		if err != nil {
			return out, err
		}
		out = append(out, p.Records...)
		if p.Next == "" || (limit > 0 && len(out) >= limit) {
			return out, nil
		}
		cursor = p.Next
	}
}
