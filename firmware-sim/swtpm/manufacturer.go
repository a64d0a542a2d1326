package swtpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// File names inside a manufacturer directory. The names follow swtpm's
// localca configuration keys (swtpm-localca.conf(8)).
const (
	signingKeyFile  = "signkey.pem"
	issuerCertFile  = "issuercert.pem"
	certSerialFile  = "certserial"
	localcaConfFile = "swtpm-localca.conf"
	localcaOptsFile = "swtpm-localca.options"
)

// manufacturerValidity is how long a simulated manufacturer root is valid.
// Real TPM manufacturer roots are long-lived too.
const manufacturerValidity = 20 * 365 * 24 * time.Hour

// Manufacturer is a simulated TPM manufacturer: a CA whose key signs the EK
// certificates swtpm_setup writes into each simulated TPM's NV memory. Its
// root certificate is what an enrollment server is configured to trust.
//
// A Manufacturer is safe for concurrent use, also by several processes:
// swtpm_localca takes a lock file in the directory while it issues.
type Manufacturer struct {
	dir     string
	cert    *x509.Certificate
	certPEM []byte
}

// NewManufacturer creates a manufacturer CA (ECDSA P-256 key, self-signed
// certificate) in dir, which is created if needed. The private key file is
// written with mode 0600. It fails with ErrManufacturerExists if dir already
// holds one; use LoadManufacturer to reuse it.
func NewManufacturer(dir string) (*Manufacturer, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("swtpm: manufacturer dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("swtpm: create manufacturer dir: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("swtpm: generate manufacturer key: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("swtpm: marshal manufacturer key: %w", err)
	}
	// O_EXCL makes creation race-free: a second NewManufacturer on the same
	// directory fails instead of replacing a key that signed certificates.
	f, err := os.OpenFile(filepath.Join(dir, signingKeyFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("swtpm: %s: %w", dir, ErrManufacturerExists)
	}
	if err != nil {
		return nil, fmt.Errorf("swtpm: create manufacturer key file: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}); err != nil {
		f.Close()
		return nil, fmt.Errorf("swtpm: write manufacturer key: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("swtpm: write manufacturer key: %w", err)
	}

	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("swtpm: manufacturer serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"fleetgate simulated TPM manufacturer"},
			CommonName:   "fleetgate simulated TPM manufacturer root CA",
		},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(manufacturerValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	certDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("swtpm: create manufacturer certificate: %w", err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})
	if err := writeFileAtomic(filepath.Join(dir, issuerCertFile), certPEM, 0o644); err != nil {
		return nil, err
	}
	// swtpm_localca reads the next serial number from this file and
	// increments it for every certificate it issues.
	if err := writeFileAtomic(filepath.Join(dir, certSerialFile), []byte("1\n"), 0o600); err != nil {
		return nil, err
	}
	return LoadManufacturer(dir)
}

// LoadManufacturer loads a manufacturer created by NewManufacturer. It checks
// that the key matches the certificate and (re)writes the swtpm_localca
// configuration with the directory's current absolute path.
func LoadManufacturer(dir string) (*Manufacturer, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("swtpm: manufacturer dir: %w", err)
	}
	certPEM, err := os.ReadFile(filepath.Join(dir, issuerCertFile))
	if err != nil {
		return nil, fmt.Errorf("swtpm: read manufacturer certificate: %w: %w", ErrManufacturerInvalid, err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("swtpm: %s: no CERTIFICATE PEM block: %w", issuerCertFile, ErrManufacturerInvalid)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("swtpm: parse manufacturer certificate: %w: %w", ErrManufacturerInvalid, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, signingKeyFile))
	if err != nil {
		return nil, fmt.Errorf("swtpm: read manufacturer key: %w: %w", ErrManufacturerInvalid, err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil || kb.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("swtpm: %s: no PRIVATE KEY PEM block: %w", signingKeyFile, ErrManufacturerInvalid)
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("swtpm: parse manufacturer key: %w: %w", ErrManufacturerInvalid, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("swtpm: manufacturer key is %T: %w", key, ErrManufacturerInvalid)
	}
	if pub, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("swtpm: manufacturer key does not match its certificate: %w", ErrManufacturerInvalid)
	}

	conf := fmt.Sprintf("statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n",
		dir,
		filepath.Join(dir, signingKeyFile),
		filepath.Join(dir, issuerCertFile),
		filepath.Join(dir, certSerialFile))
	if err := writeFileAtomic(filepath.Join(dir, localcaConfFile), []byte(conf), 0o600); err != nil {
		return nil, err
	}
	// Only used for platform certificates; swtpm_localca wants the file.
	opts := "--platform-manufacturer fleetgate\n--platform-version 1.0\n--platform-model fleetgate-sim\n"
	if err := writeFileAtomic(filepath.Join(dir, localcaOptsFile), []byte(opts), 0o600); err != nil {
		return nil, err
	}
	return &Manufacturer{dir: dir, cert: cert, certPEM: certPEM}, nil
}

// Dir returns the manufacturer's absolute directory.
func (m *Manufacturer) Dir() string { return m.dir }

// RootCert returns the manufacturer root certificate. Callers must not
// modify it.
func (m *Manufacturer) RootCert() *x509.Certificate { return m.cert }

// RootPEM returns the manufacturer root certificate, PEM encoded.
func (m *Manufacturer) RootPEM() []byte { return append([]byte(nil), m.certPEM...) }

// RootPool returns a new pool holding only the manufacturer root.
func (m *Manufacturer) RootPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(m.cert)
	return p
}

func (m *Manufacturer) localcaConfig() string  { return filepath.Join(m.dir, localcaConfFile) }
func (m *Manufacturer) localcaOptions() string { return filepath.Join(m.dir, localcaOptsFile) }

// writeFileAtomic writes data to a temporary file next to path and renames
// it into place, so readers (other processes) never see a partial file.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("swtpm: write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after a successful rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("swtpm: write %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("swtpm: chmod %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("swtpm: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("swtpm: rename %s: %w", path, err)
	}
	return nil
}

// EK certificate profile OIDs (TCG EK Credential Profile 2.3).
var (
	oidSubjectAltName     = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTCGKpEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidTPMManufacturer    = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel           = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion         = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
)

// TPMIdentity is the TPM identification an EK certificate carries in its
// subjectAltName.
type TPMIdentity struct{ Manufacturer, Model, Version string }

// SWTPMIdentity is what swtpm writes into its EK certificates.
var SWTPMIdentity = TPMIdentity{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023"}

// EKCertTemplate returns a template for an EK certificate of pub that
// follows the TCG EK Credential Profile as swtpm's do: keyEncipherment
// (RSA) or keyAgreement (ECC), the tcg-kp-EKCertificate extended key usage,
// a critical subjectAltName holding one directoryName with id's attributes,
// not a CA.
func EKCertTemplate(pub crypto.PublicKey, id TPMIdentity) (*x509.Certificate, error) {
	rdns := pkix.RDNSequence{
		{{Type: oidTPMManufacturer, Value: id.Manufacturer}},
		{{Type: oidTPMModel, Value: id.Model}},
		{{Type: oidTPMVersion, Value: id.Version}},
	}
	rb, err := asn1.Marshal(rdns)
	if err != nil {
		return nil, fmt.Errorf("swtpm: EK certificate SAN: %w", err)
	}
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rb}})
	if err != nil {
		return nil, fmt.Errorf("swtpm: EK certificate SAN: %w", err)
	}
	ku := x509.KeyUsageKeyAgreement
	if _, ok := pub.(*rsa.PublicKey); ok {
		ku = x509.KeyUsageKeyEncipherment
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "unknown"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: ku, UnknownExtKeyUsage: []asn1.ObjectIdentifier{oidTCGKpEKCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}, nil
}

// IssueEKCert signs an EK certificate for pub with the manufacturer's key,
// outside any TPM: for tests that need crafted evidence (keys no TPM holds,
// certificates with a flaw). tmpl is usually EKCertTemplate's, possibly
// modified. It returns the DER certificate.
func (m *Manufacturer) IssueEKCert(tmpl *x509.Certificate, pub crypto.PublicKey) ([]byte, error) {
	keyPEM, err := os.ReadFile(filepath.Join(m.dir, signingKeyFile))
	if err != nil {
		return nil, fmt.Errorf("swtpm: read manufacturer key: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, fmt.Errorf("swtpm: %s: no PEM block: %w", signingKeyFile, ErrManufacturerInvalid)
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("swtpm: parse manufacturer key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("swtpm: manufacturer key is %T: %w", key, ErrManufacturerInvalid)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.cert, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("swtpm: issue EK certificate: %w", err)
	}
	return der, nil
}
