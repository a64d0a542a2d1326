package operator

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// Manufacturing registration of TPM endorsement keys: one, or an import
// of many, all or none.

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.EKRegisterRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	reg, err := s.enroll.CheckEKRegistration(&req)
	if err == nil {
		err = s.cfg.Registry.RegisterEK(reg, op.String())
		if err != nil {
			err = registrationError(err)
		}
	}
	if err != nil {
		e := asAPIError(err)
		s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "ek.register", DeviceID: auditDeviceID(req.DeviceID), Outcome: registry.OutcomeDenied, Reason: e.Code + ": " + causeText(e), Remote: r.RemoteAddr})
		s.enroll.WriteError(w, r, e, req.DeviceID)
		return
	}
	s.log.Info("EK registered", logKeyDevice, reg.DeviceID, "group", reg.Group, "ek", reg.Fingerprint, logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, api.EKRegistration{DeviceID: reg.DeviceID, Group: reg.Group, EKFingerprint: reg.Fingerprint})
}

func (s *Server) handleImport(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.EKImportRequest
	if err := decodeJSONLimit(r, &req, api.MaxImportBodyBytes); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	if len(req.Entries) == 0 || len(req.Entries) > api.MaxImportEntries {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "import_size", fmt.Sprintf("an import holds 1 to %d entries, not %d", api.MaxImportEntries, len(req.Entries)), nil), "")
		return
	}
	var problems []api.ImportProblem
	problem := func(i int, err error) {
		e := asAPIError(err)
		problems = append(problems, api.ImportProblem{Index: i, Line: req.Entries[i].Line, DeviceID: req.Entries[i].DeviceID, Code: e.Code, Message: problemMessage(e)})
	}
	regs := make([]registry.EKRegistration, 0, len(req.Entries))
	idx := make([]int, 0, len(req.Entries)) // regs[k] is entry idx[k]
	for i := range req.Entries {
		reg, err := s.enroll.CheckEKRegistration(&req.Entries[i])
		if err != nil {
			problem(i, err)
			continue
		}
		regs = append(regs, reg)
		idx = append(idx, i)
	}
	// Conflicts among the valid entries and with the registry, so that one
	// answer reports every bad entry.
	rp, err := s.cfg.Registry.CheckEKImport(regs)
	if err == nil && len(rp) == 0 && len(problems) == 0 && !req.DryRun {
		err = s.cfg.Registry.ImportEKs(regs, op.String())
		var ie *registry.ImportError
		if errors.As(err, &ie) { // changed since the check
			rp, err = ie.Problems, nil
		}
	}
	if err != nil {
		if errors.Is(err, registry.ErrImportTooLarge) {
			err = apiErr(http.StatusRequestEntityTooLarge, "import_too_large", fmt.Sprintf("%d entries do not fit in one transaction; nothing was registered, split the import", len(regs)), err)
		}
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	for _, p := range rp {
		problem(idx[p.Index], registrationError(p.Err))
	}
	if len(problems) > 0 {
		slices.SortFunc(problems, func(a, b api.ImportProblem) int { return a.Index - b.Index })
		if !req.DryRun {
			s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "ek.import", Outcome: registry.OutcomeDenied,
				Reason: fmt.Sprintf("import_refused: %d of %d entries bad; nothing registered", len(problems), len(req.Entries)), Remote: r.RemoteAddr})
		}
		s.log.Warn("EK import refused", "entries", len(req.Entries), "bad", len(problems), logKeyActor, op.String())
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnprocessableEntity)
		_ = json.NewEncoder(w).Encode(struct {
			api.Error
			api.EKImportResponse
		}{api.Error{Code: "import_refused", Message: fmt.Sprintf("%d of %d entries are bad; nothing was registered", len(problems), len(req.Entries))}, api.EKImportResponse{Problems: problems}})
		return
	}
	out := api.EKImportResponse{Registered: make([]api.EKRegistration, len(regs))}
	for i, reg := range regs {
		out.Registered[i] = api.EKRegistration{DeviceID: reg.DeviceID, Group: reg.Group, EKFingerprint: reg.Fingerprint}
	}
	if req.DryRun {
		writeJSON(w, http.StatusOK, out)
		return
	}
	s.log.Info("EKs imported", "entries", len(regs), logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, out)
}
