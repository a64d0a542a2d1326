package server

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/fleetgate/fleetgate/enroll/ca"
)

// Layout is a data directory: the one place that knows what lives where in
// it. `fleetgate init` creates it (Init), `fleetgate serve` runs from it,
// the operator commands read their credentials from it, tests make one
// (internal/testenv).
//
//	ca/root.crt, ca/root.key          root CA (the key belongs offline)
//	ca/issuing.crt, ca/issuing.key    issuing CA
//	ca/trust-domain                   trust domain of the identities
//	tls/server.crt, tls/server.key    server certificate (API and broker)
//	operator/admin.crt, .key          first operator's certificate
//	registry/                         registry (badger)
//	broker/                           broker sessions and retained messages (badger)
//	policy.yaml                       topic policy, if written
//	services/<name>/                  service credentials written by `fleetgate services issue`
//
// The CA files are named by enroll/ca, which writes and reads them.
type Layout struct{ Dir string }

// Paths inside a data directory.
const (
	RegistryDir    = "registry"
	BrokerDir      = "broker"
	PolicyFileName = "policy.yaml"
	ServicesDir    = "services"
)

// RegistryDir is the registry's badger directory.
func (l Layout) RegistryDir() string { return filepath.Join(l.Dir, RegistryDir) }

// BrokerDir is the broker's badger directory.
func (l Layout) BrokerDir() string { return filepath.Join(l.Dir, BrokerDir) }

// PolicyFile is the data directory's topic policy file (it may not exist).
func (l Layout) PolicyFile() string { return filepath.Join(l.Dir, PolicyFileName) }

// ServiceDir is where `fleetgate services issue` writes a service's
// credentials by default.
func (l Layout) ServiceDir(name string) string { return filepath.Join(l.Dir, ServicesDir, name) }

// ServerCert and ServerKey are the server's TLS certificate and key.
func (l Layout) ServerCert() string { return filepath.Join(l.Dir, ca.ServerCertFile) }

// ServerKey is the server certificate's key.
func (l Layout) ServerKey() string { return filepath.Join(l.Dir, ca.ServerKeyFile) }

// OperatorCert is the first operator's certificate.
func (l Layout) OperatorCert() string { return filepath.Join(l.Dir, ca.OperatorCertFile) }

// OperatorKey is the first operator's key.
func (l Layout) OperatorKey() string { return filepath.Join(l.Dir, ca.OperatorKeyFile) }

// RootCert is the root CA certificate.
func (l Layout) RootCert() string { return filepath.Join(l.Dir, ca.RootCertFile) }

// PolicyPath is the policy file in force at start: the configured one
// (file), else the data directory's if it exists, else "" (the built-in
// default).
func (l Layout) PolicyPath(file string) string {
	if file != "" {
		return file
	}
	if _, err := os.Stat(l.PolicyFile()); err == nil {
		return l.PolicyFile()
	}
	return ""
}

// ReloadPolicyPath is the file a policy reload reads: the configured one
// (which must still exist), else <Dir>/policy.yaml if it exists now.
// Without either it is an error: a reload never falls back to the built-in
// default silently.
func (l Layout) ReloadPolicyPath(file string) (string, error) {
	if file != "" {
		return file, nil
	}
	p := l.PolicyFile()
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return p, fmt.Errorf("no policy file to reload: no --policy is configured and %s does not exist (write it, e.g. from `fleetgate policy default`)", p)
		}
		return p, fmt.Errorf("policy: %w", err)
	}
	return p, nil
}
