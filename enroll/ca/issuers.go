package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/fleetgate/fleetgate/internal/atomicfile"
)

// The issuing CAs of a data directory. The first one is ca/issuing.crt
// (written by Init); rotation adds ca/issuing-<id>.crt and its key, and the
// list of issuers with their states is ca/issuers.json (absent until the
// first rotation: then the first issuing CA is the only, current, one).
const (
	IssuersFile = "ca/issuers.json"
	// IssuingCSRFile is the CSR of the first issuing CA when the root is
	// kept elsewhere (InitExternalRoot).
	IssuingCSRFile = "ca/issuing.csr"
	// PendingInitFile holds what init --external-root will need when the
	// signed issuing CA certificate comes back (hosts, operator name).
	PendingInitFile = "ca/pending-init.json"
)

// IssuerState is the state of an issuing CA.
type IssuerState string

// Issuer states. Exactly one issuer is current: it signs every new
// certificate. Trusted issuers no longer sign, but their certificates are
// accepted (the overlap of a rotation). Retired issuers are not trusted. A
// pending issuer has a key and a CSR and waits for the root's signature
// (a root kept offline).
const (
	IssuerCurrent IssuerState = "current"
	IssuerTrusted IssuerState = "trusted"
	IssuerRetired IssuerState = "retired"
	IssuerPending IssuerState = "pending"
)

// Errors of the issuer set.
var (
	ErrRootOffline     = errors.New("ca: the root CA key is not in the data directory (offline root): create a CSR, have the root sign it, and import the certificate")
	ErrUnknownIssuer   = errors.New("ca: no such issuing CA")
	ErrIssuerIsCurrent = errors.New("ca: the current issuing CA cannot be retired; rotate first")
	ErrIssuerRetired   = errors.New("ca: issuing CA already retired")
	ErrBadIssuingCert  = errors.New("ca: issuing CA certificate refused")
)

// Issuer is one issuing CA.
type Issuer struct {
	// ID names the issuer: the first 8 bytes of SHA-256 of its public key
	// (SubjectPublicKeyInfo), in hex.
	ID      string
	Cert    *x509.Certificate
	State   IssuerState
	Added   time.Time
	Retired time.Time
	// CertFile is the certificate's file and KeyRef the key's reference
	// (a file), both relative to the data directory.
	CertFile, KeyRef string
	// CSR is the request of a pending issuer (PEM).
	CSR    []byte
	signer crypto.Signer
}

// Signer returns the issuer's key (nil for a retired issuer).
func (i *Issuer) Signer() crypto.Signer { return i.signer }

// IssuerID returns the ID of the issuing CA certificate c.
func IssuerID(c *x509.Certificate) string { return keyID(c.PublicKey) }

func keyID(pub crypto.PublicKey) string {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:8])
}

// issuerSet is an immutable snapshot of the issuers.
type issuerSet struct {
	all     []*Issuer // in the order they were added
	current *Issuer
	pool    *x509.CertPool // of the trusted (and current) issuers
}

func newIssuerSet(all []*Issuer) *issuerSet {
	s := &issuerSet{all: all, pool: x509.NewCertPool()}
	for _, i := range all {
		switch i.State {
		case IssuerCurrent:
			s.current = i
			s.pool.AddCert(i.Cert)
		case IssuerTrusted:
			s.pool.AddCert(i.Cert)
		}
	}
	return s
}

func newAuthority(dir, td string, root *x509.Certificate, o Options, issuers ...*Issuer) *Authority {
	o = o.withDefaults()
	a := &Authority{TrustDomain: td, Root: root, rand: o.Rand, now: o.Now, dir: dir, opts: o, ocsp: o.OCSPServer}
	a.set.Store(newIssuerSet(issuers))
	return a
}

// Current returns the issuing CA that signs new certificates.
func (a *Authority) Current() *Issuer { return a.set.Load().current }

// Issuing returns the current issuing CA's certificate.
func (a *Authority) Issuing() *x509.Certificate { return a.Current().Cert }

// Issuers returns every issuing CA, retired and pending ones included, in
// the order they were added.
func (a *Authority) Issuers() []*Issuer { return slices.Clone(a.set.Load().all) }

// Trusted returns the issuing CAs whose certificates are accepted: the
// current one first.
func (a *Authority) Trusted() []*Issuer {
	s := a.set.Load()
	out := []*Issuer{s.current}
	for _, i := range s.all {
		if i.State == IssuerTrusted {
			out = append(out, i)
		}
	}
	return out
}

// TrustedCerts returns the certificates of Trusted.
func (a *Authority) TrustedCerts() []*x509.Certificate {
	var out []*x509.Certificate
	for _, i := range a.Trusted() {
		out = append(out, i.Cert)
	}
	return out
}

// Issuer returns the issuing CA with id (any state).
func (a *Authority) Issuer(id string) (*Issuer, bool) {
	for _, i := range a.set.Load().all {
		if i.ID == id {
			return i, true
		}
	}
	return nil, false
}

// IssuerOf returns the issuing CA (current, trusted or retired) that signed
// c, or nil.
func (a *Authority) IssuerOf(c *x509.Certificate) *Issuer {
	for _, i := range a.set.Load().all {
		if i.State != IssuerPending && SignedBy(c, i.Cert) {
			return i
		}
	}
	return nil
}

// SignedBy reports whether c names issuer as its issuer: by the authority
// key identifier when both carry one, else by name and signature.
func SignedBy(c, issuer *x509.Certificate) bool {
	if len(c.AuthorityKeyId) > 0 && len(issuer.SubjectKeyId) > 0 {
		return bytes.Equal(c.AuthorityKeyId, issuer.SubjectKeyId)
	}
	return bytes.Equal(c.RawIssuer, issuer.RawSubject) && c.CheckSignatureFrom(issuer) == nil
}

// CRLFor signs the CRL of the trusted issuing CA id with its key; entries
// are the revoked certificates it issued.
func (a *Authority) CRLFor(id string, number uint64, entries []Revoked, validity time.Duration) ([]byte, error) {
	iss, ok := a.Issuer(id)
	if !ok || (iss.State != IssuerCurrent && iss.State != IssuerTrusted) {
		return nil, fmt.Errorf("%w: %s", ErrUnknownIssuer, id)
	}
	return a.crl(iss, number, entries, validity)
}

// ---- the issuer list on disk ----

type issuerRecord struct {
	ID      string      `json:"id"`
	Cert    string      `json:"cert,omitempty"`
	Key     string      `json:"key,omitempty"`
	CSR     string      `json:"csr,omitempty"`
	State   IssuerState `json:"state"`
	Added   time.Time   `json:"added"`
	Retired time.Time   `json:"retired,omitzero"`
}

type issuerList struct {
	Issuers []issuerRecord `json:"issuers"`
}

// FileKeys opens the key file ref (relative to dir).
func FileKeys(dir, ref string) (crypto.Signer, error) {
	return ReadKeyFile(filepath.Join(dir, ref))
}

// NewFileKey creates a P-256 key in ca/<name>.key (0600, never over an
// existing file).
func NewFileKey(dir, name string) (crypto.Signer, string, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, "", err
	}
	ref := filepath.ToSlash(filepath.Join("ca", name+".key"))
	if err := writeExclusive(filepath.Join(dir, ref), mustKeyPEM(k), 0o600); err != nil {
		return nil, "", err
	}
	return k, ref, nil
}

func (o Options) openKey(dir, ref string) (crypto.Signer, error) {
	if o.Key != nil && ref == IssuingKeyFile {
		return o.Key, nil // the first issuing CA's key, from its key store
	}
	if o.OpenKey != nil {
		return o.OpenKey(dir, ref)
	}
	return FileKeys(dir, ref)
}

func (o Options) newKey(dir, name string) (crypto.Signer, string, error) {
	if o.NewKey != nil {
		return o.NewKey(dir, name)
	}
	return NewFileKey(dir, name)
}

// loadIssuers reads the issuing CAs of dir: the list, or without one the
// first issuing CA as the current one.
func loadIssuers(dir string, root *x509.Certificate, o Options) ([]*Issuer, error) {
	b, err := os.ReadFile(filepath.Join(dir, IssuersFile))
	if errors.Is(err, fs.ErrNotExist) {
		if _, err := os.Stat(filepath.Join(dir, IssuingCertFile)); errors.Is(err, fs.ErrNotExist) {
			if _, err2 := os.Stat(filepath.Join(dir, IssuingCSRFile)); err2 == nil {
				return nil, fmt.Errorf("ca: %s has no issuing CA certificate yet: have the root sign %s, then run `fleetgate ca import-issuing CERT`",
					dir, IssuingCSRFile)
			}
		}
		b, err = json.Marshal(issuerList{Issuers: []issuerRecord{{Cert: IssuingCertFile, Key: IssuingKeyFile, State: IssuerCurrent}}})
	}
	if err != nil {
		return nil, fmt.Errorf("ca: read %s: %w", IssuersFile, err)
	}
	var l issuerList
	if err := json.Unmarshal(b, &l); err != nil {
		return nil, fmt.Errorf("ca: %s: %w", IssuersFile, err)
	}
	var out []*Issuer
	current := 0
	for _, r := range l.Issuers {
		iss, err := loadIssuer(dir, root, o, r)
		if err != nil {
			return nil, err
		}
		if iss.State == IssuerCurrent {
			current++
		}
		out = append(out, iss)
	}
	if current != 1 {
		return nil, fmt.Errorf("ca: %s names %d current issuing CAs (want exactly one)", IssuersFile, current)
	}
	return out, nil
}

func loadIssuer(dir string, root *x509.Certificate, o Options, r issuerRecord) (*Issuer, error) {
	iss := &Issuer{ID: r.ID, State: r.State, Added: r.Added, Retired: r.Retired, CertFile: r.Cert, KeyRef: r.Key}
	if r.State == IssuerPending {
		csr, err := os.ReadFile(filepath.Join(dir, r.CSR))
		if err != nil {
			return nil, fmt.Errorf("ca: pending issuing CA %s: %w", r.ID, err)
		}
		iss.CSR = csr
		return iss, nil // its key is opened when its certificate comes
	}
	c, err := ReadCertFile(filepath.Join(dir, r.Cert))
	if err != nil {
		return nil, err
	}
	iss.Cert = c
	if iss.ID == "" {
		iss.ID = IssuerID(c)
	}
	if iss.Added.IsZero() {
		iss.Added = c.NotBefore
	}
	if err := c.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("ca: issuing CA %s (%s) not signed by root: %w", iss.ID, r.Cert, err)
	}
	if r.State == IssuerRetired || o.NoKeys {
		return iss, nil // never signs (again): its key is not needed
	}
	key, err := o.openKey(dir, r.Key)
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(key.Public(), c.PublicKey) {
		return nil, fmt.Errorf("ca: %s does not match %s", r.Key, r.Cert)
	}
	iss.signer = key
	return iss, nil
}

// store writes the issuer list (atomically) and makes issuers the set in
// force. The caller holds a.mu.
func (a *Authority) store(issuers []*Issuer) error {
	if a.dir != "" {
		var l issuerList
		for _, i := range issuers {
			r := issuerRecord{ID: i.ID, Cert: i.CertFile, Key: i.KeyRef, State: i.State, Added: i.Added.UTC(), Retired: i.Retired.UTC()}
			if i.State == IssuerPending {
				r.CSR = pendingCSRFile(i.ID)
			}
			l.Issuers = append(l.Issuers, r)
		}
		b, err := json.MarshalIndent(l, "", "  ")
		if err != nil {
			return err
		}
		if err := atomicfile.Write(filepath.Join(a.dir, IssuersFile), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	a.set.Store(newIssuerSet(issuers))
	return nil
}

func pendingCSRFile(id string) string { return "ca/issuing-" + id + ".csr" }

// withIssuers runs fn on a copy of the issuers (Issuer values copied, so
// that the snapshot readers hold never changes) and stores the result.
func (a *Authority) withIssuers(fn func([]*Issuer) ([]*Issuer, error)) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var cp []*Issuer
	for _, i := range a.set.Load().all {
		c := *i
		cp = append(cp, &c)
	}
	out, err := fn(cp)
	if err != nil {
		return err
	}
	return a.store(out)
}

// ---- rotation ----

// issuingTemplate is the template of an issuing CA certificate. Every
// issuing CA after the first has its own name (with its ID), so that
// clients that build chains by name never confuse two of them.
func (a *Authority) issuingTemplate(id string, now time.Time) *x509.Certificate {
	cn := "fleetgate issuing CA " + a.TrustDomain
	if id != "" {
		cn += " " + now.UTC().Format("2006-01-02") + " " + id
	}
	return &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"fleetgate"}, CommonName: cn},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(IssuingLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
}

// RootKeyAvailable reports whether the root CA key is in the data
// directory (rotation can then sign the new issuing CA itself).
func (a *Authority) RootKeyAvailable() bool {
	_, err := os.Stat(filepath.Join(a.dir, RootKeyFile))
	return a.dir != "" && err == nil
}

// Rotate creates a new issuing CA signed by the root, makes it the current
// one and keeps the previous ones trusted (the overlap). Without the root
// key it returns ErrRootOffline: use PrepareIssuing and ImportIssuing.
func (a *Authority) Rotate() (*Issuer, error) {
	if !a.RootKeyAvailable() {
		return nil, ErrRootOffline
	}
	rootKey, err := ReadKeyFile(filepath.Join(a.dir, RootKeyFile))
	if err != nil {
		return nil, err
	}
	if !publicKeysEqual(rootKey.Public(), a.Root.PublicKey) {
		return nil, fmt.Errorf("ca: %s does not match %s", RootKeyFile, RootCertFile)
	}
	var made *Issuer
	err = a.withIssuers(func(all []*Issuer) ([]*Issuer, error) {
		now := a.now()
		name := "issuing-" + now.UTC().Format("20060102T150405.000000000")
		key, ref, err := a.opts.newKey(a.dir, name)
		if err != nil {
			return nil, fmt.Errorf("ca: new issuing key: %w", err)
		}
		id := keyID(key.Public())
		cert, err := sign(a.rand, a.issuingTemplate(id, now), a.Root, key.Public(), rootKey)
		if err != nil {
			return nil, fmt.Errorf("ca: sign issuing CA: %w", err)
		}
		made = &Issuer{ID: id, Cert: cert, State: IssuerCurrent, Added: now, CertFile: "ca/issuing-" + id + ".crt", KeyRef: ref, signer: key}
		if err := a.writeCert(made.CertFile, cert); err != nil {
			return nil, err
		}
		return promote(all, made), nil
	})
	return made, err
}

// promote makes iss the current issuer; the previous current one stays
// trusted. A pending entry of the same ID is replaced.
func promote(all []*Issuer, iss *Issuer) []*Issuer {
	out := all[:0:0]
	for _, i := range all {
		if i.ID == iss.ID {
			continue
		}
		if i.State == IssuerCurrent {
			i.State = IssuerTrusted
		}
		out = append(out, i)
	}
	return append(out, iss)
}

func (a *Authority) writeCert(rel string, c *x509.Certificate) error {
	if a.dir == "" {
		return nil
	}
	return atomicfile.Write(filepath.Join(a.dir, rel), CertPEM(c), 0o644)
}

// PrepareIssuing creates the key of a new issuing CA and returns it as a
// pending issuer with its CSR (PEM), for a root kept elsewhere to sign;
// ImportIssuing installs the signed certificate. A pending issuer is not
// trusted and signs nothing.
func (a *Authority) PrepareIssuing() (*Issuer, error) {
	var made *Issuer
	err := a.withIssuers(func(all []*Issuer) ([]*Issuer, error) {
		now := a.now()
		key, ref, err := a.opts.newKey(a.dir, "issuing-"+now.UTC().Format("20060102T150405.000000000"))
		if err != nil {
			return nil, fmt.Errorf("ca: new issuing key: %w", err)
		}
		id := keyID(key.Public())
		csr, err := issuingCSR(a.issuingTemplate(id, now).Subject, key)
		if err != nil {
			return nil, err
		}
		if a.dir != "" {
			if err := atomicfile.Write(filepath.Join(a.dir, pendingCSRFile(id)), csr, 0o644); err != nil {
				return nil, err
			}
		}
		made = &Issuer{ID: id, State: IssuerPending, Added: now, KeyRef: ref, CSR: csr}
		return append(all, made), nil
	})
	return made, err
}

func issuingCSR(subject pkix.Name, key crypto.Signer) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: subject}, key)
	if err != nil {
		return nil, fmt.Errorf("ca: issuing CA CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// CheckIssuingCert checks that c can serve as an issuing CA under root for
// the key pub: a CA certificate allowed to sign certificates, signed by
// root and naming it as issuer, valid at now, for pub, and usable for
// client certificates (no extended key usage that excludes them).
func CheckIssuingCert(c, root *x509.Certificate, pub crypto.PublicKey, now time.Time) error {
	var problems []string
	if !c.BasicConstraintsValid || !c.IsCA {
		problems = append(problems, "not a CA certificate (basicConstraints CA:TRUE missing)")
	}
	if c.KeyUsage != 0 && c.KeyUsage&x509.KeyUsageCertSign == 0 {
		problems = append(problems, "keyUsage lacks keyCertSign")
	}
	if len(c.ExtKeyUsage) > 0 && !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) && !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny) {
		problems = append(problems, "extendedKeyUsage excludes clientAuth")
	}
	if !bytes.Equal(c.RawIssuer, root.RawSubject) {
		problems = append(problems, "issuer is not the root CA")
	} else if err := c.CheckSignatureFrom(root); err != nil {
		problems = append(problems, "not signed by the root CA: "+err.Error())
	}
	if now.Before(c.NotBefore) || !now.Before(c.NotAfter) {
		problems = append(problems, fmt.Sprintf("not valid now (%s to %s)", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339)))
	}
	if pub != nil && !publicKeysEqual(pub, c.PublicKey) {
		problems = append(problems, "its public key is not the key of the CSR")
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %s", ErrBadIssuingCert, joinProblems(problems))
	}
	return nil
}

func joinProblems(p []string) string {
	var b bytes.Buffer
	for i, s := range p {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(s)
	}
	return b.String()
}

// ImportIssuing installs the certificate (PEM; extra certificates after
// the first are ignored) of a pending issuing CA, signed by the root
// elsewhere, once CheckIssuingCert passes, and makes it the current one.
func (a *Authority) ImportIssuing(certPEM []byte) (*Issuer, error) {
	certs, err := ParseCertsPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadIssuingCert, err)
	}
	c := certs[0]
	id := IssuerID(c)
	var made *Issuer
	err = a.withIssuers(func(all []*Issuer) ([]*Issuer, error) {
		var pending *Issuer
		for _, i := range all {
			if i.ID == id {
				if i.State != IssuerPending {
					return nil, fmt.Errorf("%w: issuing CA %s is already installed (%s)", ErrBadIssuingCert, id, i.State)
				}
				pending = i
			}
		}
		if pending == nil {
			return nil, fmt.Errorf("%w: its key matches no pending issuing CA (create one with `fleetgate ca rotate` while the root is offline)", ErrBadIssuingCert)
		}
		key, err := a.opts.openKey(a.dir, pending.KeyRef)
		if err != nil {
			return nil, err
		}
		if err := CheckIssuingCert(c, a.Root, key.Public(), a.now()); err != nil {
			return nil, err
		}
		made = &Issuer{ID: id, Cert: c, State: IssuerCurrent, Added: a.now(), CertFile: "ca/issuing-" + id + ".crt", KeyRef: pending.KeyRef, signer: key}
		if err := a.writeCert(made.CertFile, c); err != nil {
			return nil, err
		}
		return promote(all, made), nil
	})
	return made, err
}

// Retire stops trusting issuing CA id. The current one cannot be retired.
// Whether devices still depend on it is the caller's check.
func (a *Authority) Retire(id string) (*Issuer, error) {
	var done *Issuer
	err := a.withIssuers(func(all []*Issuer) ([]*Issuer, error) {
		for n, i := range all {
			if i.ID != id {
				continue
			}
			switch i.State {
			case IssuerPending: // never installed: forgotten
				done = i
				return slices.Delete(all, n, n+1), nil
			case IssuerCurrent:
				return nil, ErrIssuerIsCurrent
			case IssuerRetired:
				return nil, ErrIssuerRetired
			}
			i.State, i.Retired, i.signer = IssuerRetired, a.now(), nil
			done = i
			return all, nil
		}
		return nil, fmt.Errorf("%w: %s", ErrUnknownIssuer, id)
	})
	return done, err
}

// WriteFileAtomic replaces path with data: a temporary file, synced, then
// renamed over it (re-issued server and operator certificates).
func WriteFileAtomic(path string, data []byte, mode fs.FileMode) error {
	return atomicfile.Write(path, data, mode)
}
