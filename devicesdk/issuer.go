package devicesdk

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
)

// IssuerCurrent asks the enrollment server which issuing CA is current
// (api.PathCAIssuers) and reports whether the device's certificate was
// issued by it. After an issuing-CA rotation the answer is false until the
// device renews; AutoRenew then renews early (with jitter).
func (d *Device) IssuerCurrent(ctx context.Context) (bool, error) {
	leaf := d.Leaf()
	if leaf == nil {
		return false, ErrNotEnrolled
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.cfg.EnrollURL+api.PathCAIssuers, nil)
	if err != nil {
		return false, err
	}
	resp, err := d.httpClient(false).Do(req)
	if err != nil {
		return false, fmt.Errorf("devicesdk: GET %s: %w", api.PathCAIssuers, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return false, err
	}
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("enrollment server: %w", api.ReadError(resp.StatusCode, b))
	}
	var ir api.CAIssuersResponse
	if err := json.Unmarshal(b, &ir); err != nil {
		return false, fmt.Errorf("devicesdk: decode issuers: %w", err)
	}
	for _, t := range ir.Trusted {
		if t.ID != ir.Current {
			continue
		}
		blk, _ := pem.Decode([]byte(t.CertificatePEM))
		if blk == nil {
			return false, fmt.Errorf("devicesdk: current issuing CA %s: no certificate", t.ID)
		}
		cur, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return false, err
		}
		if len(leaf.AuthorityKeyId) > 0 && len(cur.SubjectKeyId) > 0 {
			return bytes.Equal(leaf.AuthorityKeyId, cur.SubjectKeyId), nil
		}
		return bytes.Equal(leaf.RawIssuer, cur.RawSubject) && leaf.CheckSignatureFrom(cur) == nil, nil
	}
	return false, fmt.Errorf("devicesdk: the server named no current issuing CA")
}
