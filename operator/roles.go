package operator

import (
	"fmt"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
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

// codeNoRole refuses everything to an operator without a role record.
const codeNoRole = "operator_no_role"

// mayDo refuses an operator without a role everything (403
// operator_no_role) and a read-only operator every change (403
// operator_read_only), and audits the refusal with the operator's name.
func (s *Server) mayDo(r *http.Request, op identity.Identity) error {
	role, err := s.cfg.Registry.OperatorRole(op.Name)
	if err != nil {
		return err
	}
	var code fleet.Reason
	var msg string
	switch {
	case role == registry.OperatorAdmin:
		return nil
	case role == registry.OperatorReadOnly && readsOnly(r):
		return nil
	case role == registry.OperatorReadOnly:
		code, msg = codeReadOnly, fmt.Sprintf("operator %s is read-only; only admin operators change anything", op.Name)
	default:
		code, msg = codeNoRole, fmt.Sprintf("operator %s has no role and may do nothing", op.Name)
	}
	action := logguard.Bound("admin "+r.Method+" "+r.URL.Path, maxLoggedField)
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: action, Outcome: registry.OutcomeDenied, Reason: string(code), Remote: r.RemoteAddr})
	return apiErr(http.StatusForbidden, code, msg, nil)
}
