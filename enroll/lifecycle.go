package enroll

// registerLifecycleRoutes registers revocation, suspension, renewal, CRL
// and EST endpoints.
func (s *Server) registerLifecycleRoutes() {}
