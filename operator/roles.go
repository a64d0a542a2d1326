package operator

import (
	"fmt"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// registerAdmin mounts the routes of the operator CLI's lists and
// actions: tokens, services, operators, clients, retained messages, the
// policy in force, groups.
func (s *Server) registerAdmin(m Mux) {
	m.HandleFunc("GET "+api.PathAdminTokens, s.admin(s.handleTokenList))
	m.HandleFunc("POST "+api.PathAdminToken+"{id}/revoke", s.admin(s.handleTokenRevoke))
	m.HandleFunc("GET "+api.PathAdminServices, s.admin(s.handleServiceList))
	m.HandleFunc("GET "+api.PathAdminService+"{name}", s.admin(s.handleServiceShow))
	m.HandleFunc("POST "+api.PathAdminService+"{name}/renew", s.admin(s.handleServiceRenew))
	m.HandleFunc("POST "+api.PathAdminService+"{name}/revoke", s.admin(s.handleServiceRevoke))
	m.HandleFunc("GET "+api.PathAdminOperators, s.admin(s.handleOperatorList))
	m.HandleFunc("POST "+api.PathAdminOperators, s.admin(s.handleOperatorAdd))
	m.HandleFunc("POST "+api.PathAdminOperator+"{name}/remove", s.admin(s.handleOperatorRemove))
	m.HandleFunc("GET "+api.PathAdminWhoAmI, s.admin(s.handleWhoAmI))
	m.HandleFunc("GET "+api.PathAdminClients, s.admin(s.handleClientList))
	m.HandleFunc("GET "+api.PathAdminClient+"{id}", s.admin(s.handleClientShow))
	m.HandleFunc("POST "+api.PathAdminClient+"{id}/disconnect", s.admin(s.handleClientDisconnect))
	m.HandleFunc("GET "+api.PathAdminRetained, s.admin(s.handleRetainedList))
	m.HandleFunc("DELETE "+api.PathAdminRetained, s.admin(s.handleRetainedDelete))
	m.HandleFunc("GET "+api.PathAdminPolicy, s.admin(s.handlePolicyShow))
	m.HandleFunc("POST "+api.PathAdminGroup+"{group}/{action}", s.admin(s.handleGroupAction))
}

// codeReadOnly refuses a change by a read-only operator.
const codeReadOnly = "operator_read_only"

// readOnlyMethod: the request only reads.
func readOnlyMethod(m string) bool { return m == http.MethodGet || m == http.MethodHead }

// readsOnly: the request changes nothing, though some such requests are
// POSTs because they carry a body (diagnose takes a certificate) or mint
// something for the caller alone (a console sign-in link, whose session
// has the operator's own role). A read-only operator may make them.
func readsOnly(r *http.Request) bool {
	if readOnlyMethod(r.Method) {
		return true
	}
	return r.Method == http.MethodPost && (r.URL.Path == api.PathAdminDiagnose || r.URL.Path == api.PathAdminConsoleLogin)
}

// mayChange refuses a change by a read-only operator (403
// operator_read_only) and audits the refusal with the operator's name.
func (s *Server) mayChange(r *http.Request, op identity.Identity) error {
	role, err := s.cfg.Registry.OperatorRole(op.Name)
	if err != nil {
		return err
	}
	if role == registry.OperatorAdmin {
		return nil
	}
	action := logguard.Bound("admin "+r.Method+" "+r.URL.Path, maxLoggedField)
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: action, Outcome: registry.OutcomeDenied, Reason: codeReadOnly, Remote: r.RemoteAddr})
	return apiErr(http.StatusForbidden, codeReadOnly, fmt.Sprintf("operator %s is read-only; only admin operators change anything", op.Name), nil)
}
