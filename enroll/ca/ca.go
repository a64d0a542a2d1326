// Package ca is fleetgate's certificate authority: it creates the PKI of a
// data directory (root CA P-384, issuing CA P-256, server TLS certificate,
// operator certificate), loads it, checks CSRs and signs leaf certificates
// from templates. It records nothing: the caller (enroll) records every
// certificate in the registry before handing it out.
package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Files of a data directory, relative to its root.
const (
	RootCertFile     = "ca/root.crt"
	RootKeyFile      = "ca/root.key"
	IssuingCertFile  = "ca/issuing.crt"
	IssuingKeyFile   = "ca/issuing.key"
	TrustDomainFile  = "ca/trust-domain"
	ServerCertFile   = "tls/server.crt"
	ServerKeyFile    = "tls/server.key"
	OperatorCertFile = "operator/admin.crt"
	OperatorKeyFile  = "operator/admin.key"
)

// Lifetimes.
const (
	RootLifetime     = 20 * 365 * 24 * time.Hour
	IssuingLifetime  = 5 * 365 * 24 * time.Hour
	ServerLifetime   = 365 * 24 * time.Hour
	OperatorLifetime = 365 * 24 * time.Hour
	// DefaultDeviceLifetime is the default device certificate lifetime.
	DefaultDeviceLifetime = 90 * 24 * time.Hour
	// backdate absorbs small clock skew between server and devices.
	backdate = 5 * time.Minute
)

// Authority signs certificates with the current issuing CA and knows the
// set of issuing CAs the fleet trusts (issuers.go): the set changes at a
// rotation while the process runs, so it is read through methods.
type Authority struct {
	TrustDomain string
	Root        *x509.Certificate
	rand        io.Reader
	now         func() time.Time
	// dir is the data directory (empty: in memory only).
	dir  string
	opts Options
	// mu serialises changes of the issuer set; set is read without it.
	mu  sync.Mutex
	set atomic.Pointer[issuerSet]
	// ocsp are the OCSP responder URLs put in the AIA of issued leaves.
	ocsp []string
}

// Options inject randomness and time; zero values mean crypto/rand and
// time.Now.
type Options struct {
	Rand io.Reader
	Now  func() time.Time
	// OpenKey opens the private key of an issuing CA by its reference in
	// the data directory's issuer list; NewKey creates the key of a new
	// issuing CA (rotation) and returns its reference. nil: key files in
	// the data directory (FileKeys). A hardware key store plugs in here.
	OpenKey func(dir, ref string) (crypto.Signer, error)
	NewKey  func(dir, name string) (crypto.Signer, string, error)
	// NoKeys loads the issuing CAs' certificates only (a process that
	// signs nothing, such as a broker apart): no key is opened, and
	// signing fails.
	NoKeys bool
	// Key is the issuing CA's key from a key store (enroll/ca/keystore):
	// Init certifies it instead of generating one (no ca/issuing.key is
	// written), Load uses it instead of reading ca/issuing.key and checks
	// that it matches the certificate.
	Key crypto.Signer
	// OCSPServer URLs go into the AIA extension of issued leaves.
	OCSPServer []string
}

func (o Options) withDefaults() Options {
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// InitOptions configure Init.
type InitOptions struct {
	Options
	TrustDomain string
	// Hosts are the DNS names and IP addresses of the server certificate.
	Hosts []string
	// Operator is the name of the first operator (default "admin").
	Operator string
}

// InitResult lists what Init wrote.
type InitResult struct {
	Authority *Authority
	// Operator is the operator certificate (the caller records it).
	Operator *x509.Certificate
	Server   *x509.Certificate
}

// Initialized reports whether dir already holds a root CA.
func Initialized(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, RootKeyFile))
	_, err2 := os.Stat(filepath.Join(dir, RootCertFile))
	return err == nil || err2 == nil
}

// Init creates the PKI in dir. It never overwrites an existing CA: if any CA
// file exists it returns ErrAlreadyInitialized and writes nothing.
func Init(dir string, o InitOptions) (*InitResult, error) {
	o.Options = o.Options.withDefaults()
	if err := identity.ValidateTrustDomain(o.TrustDomain); err != nil {
		return nil, err
	}
	if o.Operator == "" {
		o.Operator = "admin"
	}
	opID, err := identity.New(identity.RoleOperator, o.Operator)
	if err != nil {
		return nil, fmt.Errorf("operator name: %w", err)
	}
	for _, f := range []string{RootCertFile, RootKeyFile, IssuingCertFile, IssuingKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return nil, fmt.Errorf("%w (%s exists)", ErrAlreadyInitialized, filepath.Join(dir, f))
		}
	}
	now := o.Now()

	rootKey, err := ecdsa.GenerateKey(elliptic.P384(), o.Rand)
	if err != nil {
		return nil, fmt.Errorf("generate root key: %w", err)
	}
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"fleetgate"}, CommonName: "fleetgate root CA " + o.TrustDomain},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(RootLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	root, err := sign(o.Rand, rootTmpl, nil, rootKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("root CA: %w", err)
	}
	var issKey crypto.Signer = o.Key
	if issKey == nil {
		if issKey, err = ecdsa.GenerateKey(elliptic.P256(), o.Rand); err != nil {
			return nil, fmt.Errorf("generate issuing key: %w", err)
		}
	}
	issTmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"fleetgate"}, CommonName: "fleetgate issuing CA " + o.TrustDomain},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(IssuingLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	issuing, err := sign(o.Rand, issTmpl, root, issKey.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("issuing CA: %w", err)
	}
	a := newAuthority(dir, o.TrustDomain, root, o.Options, &Issuer{ID: IssuerID(issuing), Cert: issuing, State: IssuerCurrent,
		Added: issuing.NotBefore, CertFile: IssuingCertFile, KeyRef: IssuingKeyFile, signer: issKey})

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), o.Rand)
	if err != nil {
		return nil, err
	}
	server, err := a.IssueServer(o.Hosts, srvKey.Public(), ServerLifetime)
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

	var issKeyPEM []byte
	if o.Key == nil {
		issKeyPEM = mustKeyPEM(issKey)
	}
	// Keys are written with O_EXCL: a concurrent init cannot clobber a CA.
	writes := []struct {
		name string
		data []byte
		key  bool
	}{
		{RootKeyFile, mustKeyPEM(rootKey), true},
		{RootCertFile, CertPEM(root), false},
		{IssuingKeyFile, issKeyPEM, true},
		{IssuingCertFile, CertPEM(issuing), false},
		{TrustDomainFile, []byte(o.TrustDomain + "\n"), false},
		{ServerKeyFile, mustKeyPEM(srvKey), true},
		{ServerCertFile, append(CertPEM(server), CertPEM(issuing)...), false},
		{OperatorKeyFile, mustKeyPEM(opKey), true},
		{OperatorCertFile, append(CertPEM(operator), CertPEM(issuing)...), false},
	}
	for _, w := range writes {
		if w.name == IssuingKeyFile && o.Key != nil {
			continue // the key lives in its store
		}
		mode := fs.FileMode(0o644)
		if w.key {
			mode = 0o600
		}
		if err := writeExclusive(filepath.Join(dir, w.name), w.data, mode); err != nil {
			return nil, err
		}
	}
	return &InitResult{Authority: a, Operator: operator, Server: server}, nil
}

// Load reads the issuing CA of dir.
func Load(dir string, o Options) (*Authority, error) {
	o = o.withDefaults()
	if !Initialized(dir) {
		return nil, fmt.Errorf("%w: %s", ErrNotInitialized, dir)
	}
	td, err := os.ReadFile(filepath.Join(dir, TrustDomainFile))
	if err != nil {
		return nil, fmt.Errorf("read trust domain: %w", err)
	}
	root, err := ReadCertFile(filepath.Join(dir, RootCertFile))
	if err != nil {
		return nil, err
	}
	issuers, err := loadIssuers(dir, root, o)
	if err != nil {
		return nil, err
	}
	return newAuthority(dir, strings.TrimSpace(string(td)), root, o, issuers...), nil
}

// Signer is the current issuing CA's key (e.g. to certify a delegated
// OCSP signer); Trusted gives every trusted CA's (Issuer.Signer).
func (a *Authority) Signer() crypto.Signer { return a.Current().signer }

// Now is the authority's clock.
func (a *Authority) Now() time.Time { return a.now() }

// Roots returns a pool holding the root CA.
func (a *Authority) Roots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(a.Root)
	return p
}

// ClientCAs returns the pool used to verify client certificates: the
// trusted issuing CAs only (not the root), so that nothing the root might
// sign elsewhere is accepted. It changes at a rotation or retirement.
func (a *Authority) ClientCAs() *x509.CertPool { return a.set.Load().pool }

// ChainPEM returns leaf + the issuing CA that signed it as PEM.
func (a *Authority) ChainPEM(leaf *x509.Certificate) string {
	iss := a.IssuerOf(leaf)
	if iss == nil {
		iss = a.Current()
	}
	return string(CertPEM(leaf)) + string(CertPEM(iss.Cert))
}

// RootPEM returns the root CA as PEM.
func (a *Authority) RootPEM() string { return string(CertPEM(a.Root)) }

// Issue signs a client certificate for id: ECDSA/RSA key from a checked CSR,
// clientAuth EKU only, digitalSignature key usage, random 128-bit serial,
// exactly one URI SAN, CN = name.
func (a *Authority) Issue(id identity.Identity, pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, error) {
	if err := checkKey(pub); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		ttl = DefaultDeviceLifetime
	}
	iss := a.Current()
	now := a.now()
	notAfter := now.Add(ttl)
	if notAfter.After(iss.Cert.NotAfter) {
		notAfter = iss.Cert.NotAfter
	}
	// Backdated for clock skew, but by little for short lifetimes, so that
	// renewal at 2/3 of NotBefore..NotAfter stays 2/3 of the real lifetime.
	bd := min(backdate, ttl/10)
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: id.Name, OrganizationalUnit: []string{string(id.Role)}},
		NotBefore:   now.Add(-bd),
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{id.URI(a.TrustDomain)},
		OCSPServer:  a.ocsp,
	}
	return sign(a.rand, tmpl, iss.Cert, pub, iss.signer)
}

// IssueServer signs a TLS server certificate for hosts (DNS names or IPs).
func (a *Authority) IssueServer(hosts []string, pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, error) {
	if len(hosts) == 0 {
		return nil, errors.New("ca: server certificate needs at least one host name or IP")
	}
	iss := a.Current()
	now := a.now()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: hosts[0], Organization: []string{"fleetgate"}},
		NotBefore:   now.Add(-backdate),
		NotAfter:    now.Add(ttl),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		OCSPServer:  a.ocsp,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return sign(a.rand, tmpl, iss.Cert, pub, iss.signer)
}

// CheckCSR parses a DER PKCS#10 request, checks its self-signature and that
// its key is one the CA certifies. Identity fields in the CSR are ignored:
// the identity comes from the enrollment, never from the request.
func CheckCSR(der []byte) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformedCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCSRSignature, err)
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, err
	}
	return csr, nil
}

func checkKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("%w: ECDSA curve %s (want P-256 or P-384)", ErrWeakKey, k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("%w: RSA-%d (want at least 2048 bits)", ErrWeakKey, k.N.BitLen())
		}
	default:
		return fmt.Errorf("%w: %T", ErrWeakKey, pub)
	}
	return nil
}

// NewSerial returns a random positive 128-bit serial number.
func NewSerial(r io.Reader) (*big.Int, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	b[0] &= 0x7f // positive and at most 16 octets in DER
	b[0] |= 0x40 // and never short: 127 bits of which 126 random
	return new(big.Int).SetBytes(b), nil
}

// SerialString formats a serial as the registry keys it (fleet.SerialString).
func SerialString(n *big.Int) string { return fleet.SerialString(n) }

func sign(r io.Reader, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	serial, err := NewSerial(r)
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	if spki, err := x509.MarshalPKIXPublicKey(pub); err == nil {
		sum := sha256.Sum256(spki)
		tmpl.SubjectKeyId = sum[:20]
	}
	der, err := createCertificate(r, tmpl, parent, pub, key) // signtbs.go
	if err != nil {
		return nil, fmt.Errorf("x509.CreateCertificate: %w", err)
	}
	return x509.ParseCertificate(der)
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type eq interface{ Equal(crypto.PublicKey) bool }
	ae, ok := a.(eq)
	return ok && ae.Equal(b)
}

// CertPEM encodes a certificate as PEM.
func CertPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// KeyPEM encodes a private key as PKCS#8 PEM.
func KeyPEM(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func mustKeyPEM(k crypto.Signer) []byte {
	b, err := KeyPEM(k)
	if err != nil {
		panic(err) // only for keys generated above, which always marshal
	}
	return b
}

// ReadCertFile reads the first certificate of a PEM file.
func ReadCertFile(path string) (*x509.Certificate, error) {
	certs, err := ReadCertsFile(path)
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// ReadCertsFile reads every certificate of a PEM file.
func ReadCertsFile(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	certs, err := ParseCertsPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

// ParseCertsPEM parses every CERTIFICATE block of b.
func ParseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate: %w", err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate in PEM")
	}
	return out, nil
}

// ReadKeyFile reads a PEM private key (PKCS#8, SEC 1 or PKCS#1).
func ReadKeyFile(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	k, err := ParseKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// ParseKeyPEM parses a PEM private key.
func ParseKeyPEM(b []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block")
	}
	if k, err := x509.ParsePKCS8PrivateKey(blk.Bytes); err == nil {
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
		return nil, fmt.Errorf("key type %T is not a signer", k)
	}
	if k, err := x509.ParseECPrivateKey(blk.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(blk.Bytes); err == nil {
		return k, nil
	}
	return nil, errors.New("unsupported private key encoding")
}

// writeExclusive creates path (and its folder) with mode, failing if it
// exists.
func writeExclusive(path string, data []byte, mode fs.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w (%s exists)", ErrAlreadyInitialized, path)
		}
		return fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := io.Copy(f, bytes.NewReader(data)); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return f.Close()
}

// NewPool returns a pool holding certs.
func NewPool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}
