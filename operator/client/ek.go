package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
)

// RegisterEK registers one TPM endorsement key for a device.
func (c *Client) RegisterEK(ctx context.Context, req api.EKRegisterRequest) (*api.EKRegistration, error) {
	var out api.EKRegistration
	return &out, c.do(ctx, http.MethodPost, api.PathAdminDevicesRegister, req, &out)
}

// ImportError is a refused import: nothing was registered, and Problems
// lists every bad entry. It is also an *api.Error (errors.As).
type ImportError struct {
	Answer   *api.Error
	Problems []api.ImportProblem
}

func (e *ImportError) Error() string {
	return fmt.Sprintf("server said %v (%d bad entries)", e.Answer, len(e.Problems))
}

// Unwrap returns the *api.Error of the answer.
func (e *ImportError) Unwrap() error { return e.Answer }

// ImportEKs registers many EKs in one transaction, all or none. A refusal
// because of bad entries is an *ImportError listing all of them.
func (c *Client) ImportEKs(ctx context.Context, req api.EKImportRequest) (*api.EKImportResponse, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+api.PathAdminDevicesImport, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(hr)
	if err != nil {
		return nil, fmt.Errorf("POST %s: %w", api.PathAdminDevicesImport, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	var out struct {
		api.Error
		api.EKImportResponse
	}
	if err := json.Unmarshal(body, &out); err != nil && resp.StatusCode/100 == 2 {
		return nil, fmt.Errorf("POST %s: decode answer: %w", api.PathAdminDevicesImport, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &api.Error{Status: resp.StatusCode, Code: out.Code, Message: out.Message}
		if e.Code == "" {
			e.Message = string(body)
		}
		if len(out.Problems) > 0 {
			return nil, &ImportError{Answer: e, Problems: out.Problems}
		}
		return nil, answerError(e)
	}
	return &out.EKImportResponse, nil
}
