package enroll

// registerTPMRoutes registers the TPM attestation enrollment endpoints.
func (s *Server) registerTPMRoutes() {}
