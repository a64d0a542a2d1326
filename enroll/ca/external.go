package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/fleetgate/fleetgate/identity"
)

// An offline root: the root CA key never touches the server. InitExternalRoot
// installs the root's certificate, creates the first issuing CA's key and
// writes its CSR (ca/issuing.csr); the root signs it elsewhere (openssl, an
// offline CA); CompleteExternalRoot checks the signed certificate and
// finishes what Init does (server and operator certificates).

type pendingInit struct {
	Hosts    []string `json:"hosts"`
	Operator string   `json:"operator"`
}

// InitExternalRoot starts an initialisation under the root CA rootPEM, kept
// elsewhere. It returns the CSR (PEM) the root must sign.
func InitExternalRoot(dir string, o InitOptions, rootPEM []byte) ([]byte, error) {
	o.Options = o.Options.withDefaults()
	if err := identity.ValidateTrustDomain(o.TrustDomain); err != nil {
		return nil, err
	}
	if o.Operator == "" {
		o.Operator = "admin"
	}
	if _, err := identity.New(identity.RoleOperator, o.Operator); err != nil {
		return nil, fmt.Errorf("operator name: %w", err)
	}
	certs, err := ParseCertsPEM(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("external root: %w", err)
	}
	root := certs[0]
	if !root.BasicConstraintsValid || !root.IsCA || root.CheckSignatureFrom(root) != nil {
		return nil, errors.New("external root: not a self-signed CA certificate")
	}
	if !o.Now().Before(root.NotAfter) {
		return nil, errors.New("external root: expired")
	}
	for _, f := range []string{RootCertFile, RootKeyFile, IssuingCertFile, IssuingKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return nil, fmt.Errorf("%w (%s exists)", ErrAlreadyInitialized, filepath.Join(dir, f))
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), o.Rand)
	if err != nil {
		return nil, err
	}
	a := &Authority{TrustDomain: o.TrustDomain}
	csr, err := issuingCSR(a.issuingTemplate("", o.Now()).Subject, key)
	if err != nil {
		return nil, err
	}
	pi, _ := json.Marshal(pendingInit{Hosts: o.Hosts, Operator: o.Operator})
	for _, w := range []struct {
		name string
		data []byte
		mode fs.FileMode
	}{
		{IssuingKeyFile, mustKeyPEM(key), 0o600},
		{IssuingCSRFile, csr, 0o644},
		{PendingInitFile, pi, 0o644},
		{TrustDomainFile, []byte(o.TrustDomain + "\n"), 0o644},
		{RootCertFile, CertPEM(root), 0o644},
	} {
		if err := writeExclusive(filepath.Join(dir, w.name), w.data, w.mode); err != nil {
			return nil, err
		}
	}
	return csr, nil
}

// PendingExternalRoot reports whether dir waits for its first issuing CA
// certificate (InitExternalRoot ran, CompleteExternalRoot not yet).
func PendingExternalRoot(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, PendingInitFile))
	_, err2 := os.Stat(filepath.Join(dir, IssuingCertFile))
	return err == nil && errors.Is(err2, fs.ErrNotExist)
}

// CompleteExternalRoot installs the signed first issuing CA certificate
// (PEM) once CheckIssuingCert passes, then issues the server and operator
// certificates as Init does.
func CompleteExternalRoot(dir string, certPEM []byte, o Options) (*InitResult, error) {
	o = o.withDefaults()
	if !PendingExternalRoot(dir) {
		return nil, fmt.Errorf("ca: %s does not wait for an issuing CA certificate (no init --external-root pending)", dir)
	}
	var pi pendingInit
	b, err := os.ReadFile(filepath.Join(dir, PendingInitFile))
	if err == nil {
		err = json.Unmarshal(b, &pi)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", PendingInitFile, err)
	}
	td, err := os.ReadFile(filepath.Join(dir, TrustDomainFile))
	if err != nil {
		return nil, err
	}
	root, err := ReadCertFile(filepath.Join(dir, RootCertFile))
	if err != nil {
		return nil, err
	}
	key, err := ReadKeyFile(filepath.Join(dir, IssuingKeyFile))
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadIssuingCert, err)
	}
	issuing := certs[0]
	if err := CheckIssuingCert(issuing, root, key.Public(), o.Now()); err != nil {
		return nil, err
	}
	opID, err := identity.New(identity.RoleOperator, pi.Operator)
	if err != nil {
		return nil, err
	}
	a := newAuthority(dir, string(trimNL(td)), root, o, &Issuer{ID: IssuerID(issuing), Cert: issuing, State: IssuerCurrent,
		Added: o.Now(), CertFile: IssuingCertFile, KeyRef: IssuingKeyFile, signer: key})
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), o.Rand)
	if err != nil {
		return nil, err
	}
	server, err := a.IssueServer(pi.Hosts, srvKey.Public(), ServerLifetime)
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w", err)
	}
	opKey, err := ecdsa.GenerateKey(elliptic.P256(), o.Rand)
	if err != nil {
		return nil, err
	}
	operator, err := a.Issue(opID, opKey.Public(), OperatorLifetime)
	if err != nil {
		return nil, fmt.Errorf("operator certificate: %w", err)
	}
	for _, w := range []struct {
		name string
		data []byte
		mode fs.FileMode
	}{
		{ServerKeyFile, mustKeyPEM(srvKey), 0o600},
		{ServerCertFile, append(CertPEM(server), CertPEM(issuing)...), 0o644},
		{OperatorKeyFile, mustKeyPEM(opKey), 0o600},
		{OperatorCertFile, append(CertPEM(operator), CertPEM(issuing)...), 0o644},
		{IssuingCertFile, CertPEM(issuing), 0o644}, // last: it ends the pending state
	} {
		if err := writeExclusive(filepath.Join(dir, w.name), w.data, w.mode); err != nil {
			return nil, err
		}
	}
	_ = os.Remove(filepath.Join(dir, PendingInitFile))
	return &InitResult{Authority: a, Operator: operator, Server: server}, nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
