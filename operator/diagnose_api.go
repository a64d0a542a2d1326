package operator

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/diagnose"
)

// maxDiagnoseChain bounds the certificates of one diagnose request.
const maxDiagnoseChain = 8

// handleDiagnose runs the broker's checks on a certificate chain, or on a
// device's current certificate from the registry (`fleetgate diagnose`),
// with the broker's client CAs and this process's directory.
func (s *Server) handleDiagnose(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	var req api.DiagnoseRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	for _, n := range []string{req.DeviceID, req.ClientID} {
		if n == "" {
			continue
		}
		if err := identity.ValidateName(n); err != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
			return
		}
	}
	env := diagnose.Env{ClientCAs: s.cfg.CA.ClientCAs(), Anchors: []*x509.Certificate{s.cfg.CA.Issuing},
		Others: []*x509.Certificate{s.cfg.CA.Root}, TrustDomain: s.cfg.CA.TrustDomain, Directory: s.dir, Now: time.Now()}
	var chain []*x509.Certificate
	switch {
	case req.ChainPEM != "":
		rest := []byte(req.ChainPEM)
		for len(chain) <= maxDiagnoseChain {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			if b.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_certificate", "a certificate of the chain does not parse", err), "")
				return
			}
			chain = append(chain, c)
		}
		if len(chain) == 0 || len(chain) > maxDiagnoseChain {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_certificate", "chain_pem must hold 1 to 8 PEM certificates, the device's first", nil), "")
			return
		}
	case req.DeviceID != "":
		d, err := s.cfg.Registry.Device(req.DeviceID)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(registryError(err)), req.DeviceID)
			return
		}
		if d.CurrentSerial == "" {
			writeJSON(w, http.StatusOK, api.DiagnoseReport{Reason: string(fleet.ReasonNoCert), Problem: diagnose.ProblemNotEnrolled, ServerTime: env.Now.UTC(),
				Summary: "Device " + d.ID + " is " + string(d.State) + " and has no certificate yet: it must enroll first (`fleetgate tokens create`, or TPM attestation after `fleetgate devices register-ek`)."})
			return
		}
		rec, err := s.cfg.Registry.Certificate(d.CurrentSerial)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(registryError(err)), req.DeviceID)
			return
		}
		c, err := x509.ParseCertificate(rec.DER)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(errors.Join(errors.New("stored certificate does not parse"), err)), req.DeviceID)
			return
		}
		chain = []*x509.Certificate{c}
	default:
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_request", "give chain_pem or device_id", nil), "")
		return
	}
	writeJSON(w, http.StatusOK, diagnose.Certificate(env, chain, req.DeviceID, req.ClientID))
}
