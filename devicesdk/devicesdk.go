// Package devicesdk is what runs on a device: it enrolls the device's key
// (a crypto.Signer: a TPM-resident key from devicesdk/tpmkey, or a software
// key for devices without TPM), keeps the certificate chain in a state
// directory, and connects to the broker over mTLS with paho.mqtt.golang,
// publishing and subscribing on the device's own topics.
//
// The private key never passes through this package: crypto/tls asks the
// Signer to sign the handshake.
package devicesdk

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/atomicfile"
)

// Files in a device's state directory.
const (
	ChainFile   = "cert.pem"   // leaf + issuing CA
	CAFile      = "ca.pem"     // roots to trust for broker and enrollment
	SoftKeyFile = "device.key" // software key (devices without TPM only)
)

// Sentinel errors.
var (
	// ErrNotEnrolled: no certificate in the state directory yet.
	ErrNotEnrolled = errors.New("devicesdk: device not enrolled")
)

// Config configures a Device.
type Config struct {
	// DeviceID is the device's ID (see internal/identity rules).
	DeviceID string
	// Key is the device's TLS key. For TPM devices, a tpmkey key.
	Key crypto.Signer
	// StateDir keeps the certificate chain and CA certificates.
	StateDir string
	// EnrollURL is the enrollment server's base URL, e.g.
	// https://gateway.example:8443.
	EnrollURL string
	// RootCAs verifies the enrollment server before the device has its own
	// CA file (the factory-provisioned trust anchor).
	RootCAs *x509.CertPool
	// HTTPClient overrides the HTTP client (its TLS config is replaced).
	HTTPClient *http.Client
}

// Device is one device's identity and connection factory. Safe for
// concurrent use.
type Device struct {
	cfg  Config
	mu   sync.RWMutex
	cert *tls.Certificate
	ca   *x509.CertPool

	routeMu sync.RWMutex
	routes  []route // message handlers by filter, kept across connections

	// hc is the enrollment server client for hcCert and hcRoots (under mu).
	hc      *http.Client
	hcCert  *tls.Certificate
	hcRoots *x509.CertPool
}

// New returns a Device, loading a previously stored certificate if any.
func New(cfg Config) (*Device, error) {
	if err := identity.ValidateName(cfg.DeviceID); err != nil {
		return nil, err
	}
	if cfg.Key == nil {
		return nil, errors.New("devicesdk: Key is required")
	}
	if cfg.StateDir == "" {
		return nil, errors.New("devicesdk: StateDir is required")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("devicesdk: state dir: %w", err)
	}
	d := &Device{cfg: cfg}
	if err := d.load(); err != nil && !errors.Is(err, ErrNotEnrolled) {
		return nil, err
	}
	return d, nil
}

// ID returns the device ID.
func (d *Device) ID() string { return d.cfg.DeviceID }

// Enrolled reports whether the device holds a certificate.
func (d *Device) Enrolled() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.cert != nil
}

// Leaf returns the current certificate, or nil.
func (d *Device) Leaf() *x509.Certificate {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.cert == nil {
		return nil
	}
	return d.cert.Leaf
}

func (d *Device) load() error {
	chain, err := os.ReadFile(filepath.Join(d.cfg.StateDir, ChainFile))
	if errors.Is(err, fs.ErrNotExist) {
		return ErrNotEnrolled
	}
	if err != nil {
		return fmt.Errorf("devicesdk: read chain: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(d.cfg.StateDir, CAFile))
	if err != nil {
		return fmt.Errorf("devicesdk: read CA: %w", err)
	}
	return d.install(chain, caPEM)
}

// install checks that chain's leaf is for our key and makes it current.
func (d *Device) install(chainPEM, caPEM []byte) error {
	var tc tls.Certificate
	rest := chainPEM
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			tc.Certificate = append(tc.Certificate, b.Bytes)
		}
	}
	if len(tc.Certificate) == 0 {
		return errors.New("devicesdk: certificate chain has no certificate")
	}
	leaf, err := x509.ParseCertificate(tc.Certificate[0])
	if err != nil {
		return fmt.Errorf("devicesdk: parse leaf: %w", err)
	}
	type eq interface{ Equal(crypto.PublicKey) bool }
	if k, ok := d.cfg.Key.Public().(eq); !ok || !k.Equal(leaf.PublicKey) {
		return errors.New("devicesdk: certificate is not for this device's key")
	}
	tc.Leaf = leaf
	tc.PrivateKey = d.cfg.Key
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return errors.New("devicesdk: no CA certificate in CA file")
	}
	d.mu.Lock()
	d.cert, d.ca = &tc, pool
	d.mu.Unlock()
	return nil
}

// CSR returns a DER PKCS#10 request signed by the device key.
func (d *Device) CSR() ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: d.cfg.DeviceID},
	}, d.cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("devicesdk: create CSR: %w", err)
	}
	return der, nil
}

// EnrollWithToken enrolls with a one-time bootstrap token and stores the
// certificate chain.
func (d *Device) EnrollWithToken(ctx context.Context, token string) error {
	defer d.closeIdle()
	csr, err := d.CSR()
	if err != nil {
		return err
	}
	var resp api.EnrollResponse
	if err := d.post(ctx, api.PathEnrollToken, api.TokenEnrollRequest{Token: token, DeviceID: d.cfg.DeviceID, CSR: csr}, &resp); err != nil {
		return err
	}
	return d.Store(&resp)
}

// Store installs and persists an enrollment response.
func (d *Device) Store(resp *api.EnrollResponse) error {
	if resp.DeviceID != d.cfg.DeviceID {
		return fmt.Errorf("devicesdk: server issued for %q, not %q", resp.DeviceID, d.cfg.DeviceID)
	}
	if err := d.install([]byte(resp.CertificateChainPEM), []byte(resp.CACertificatesPEM)); err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(d.cfg.StateDir, CAFile), []byte(resp.CACertificatesPEM), 0o644); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(d.cfg.StateDir, ChainFile), []byte(resp.CertificateChainPEM), 0o644)
}

// httpClient returns the client for the enrollment server, presenting the
// device's certificate when withCert (renewal authenticates with it;
// enrollment does not use it, and presenting it would cost the device a key
// signature — a TPM operation — and the server its verification). It is
// kept while the certificate presented and the CA stay the same, so the two
// round trips of a TPM enrollment share one TLS connection.
func (d *Device) httpClient(withCert bool) *http.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	roots := d.ca
	if roots == nil {
		roots = d.cfg.RootCAs
	}
	var cert *tls.Certificate
	if withCert {
		cert = d.cert
	}
	if d.hc != nil && d.hcCert == cert && d.hcRoots == roots {
		return d.hc
	}
	if d.hc != nil {
		d.hc.CloseIdleConnections()
	}
	tcfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		tcfg.Certificates = []tls.Certificate{*cert}
	}
	c := &http.Client{Timeout: 30 * time.Second}
	if d.cfg.HTTPClient != nil {
		cc := *d.cfg.HTTPClient
		c = &cc
	}
	// HTTP/1.1 keep-alive: two small round trips need no HTTP/2.
	c.Transport = &http.Transport{TLSClientConfig: tcfg, IdleConnTimeout: 90 * time.Second}
	d.hc, d.hcCert, d.hcRoots = c, cert, roots
	return c
}

// closeIdle closes the HTTPS connection kept between the round trips of an
// enrollment or renewal once it is over: a device talks to the enrollment
// service rarely, and an idle connection held for 90 s by each device of an
// enrollment wave would hold the server's memory and goroutines for nothing.
func (d *Device) closeIdle() {
	d.mu.RLock()
	hc := d.hc
	d.mu.RUnlock()
	if hc != nil {
		hc.CloseIdleConnections()
	}
}

// post sends a JSON request to the enrollment server and decodes the answer.
func (d *Device) post(ctx context.Context, path string, in, out any) error {
	// Only renewal authenticates with the device's certificate.
	return d.postAs(ctx, path, in, out, path == api.PathRenew)
}

// postAs is post, presenting the device's certificate when withCert.
func (d *Device) postAs(ctx context.Context, path string, in, out any, withCert bool) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.cfg.EnrollURL+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("devicesdk: request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	c := d.httpClient(withCert)
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("devicesdk: POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("devicesdk: read answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		// An *api.Error (errors.As).
		return fmt.Errorf("enrollment server: %w", api.ReadError(resp.StatusCode, b))
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("devicesdk: decode answer: %w", err)
	}
	return nil
}

// TLSConfig returns the client TLS configuration for the broker: TLS 1.3,
// the device certificate (its key signs inside the Signer), the stored CA.
// The certificate is read at each handshake, so a renewed certificate is
// used by the next connection.
func (d *Device) TLSConfig(serverName string) (*tls.Config, error) {
	d.mu.RLock()
	roots := d.ca
	d.mu.RUnlock()
	if roots == nil {
		return nil, ErrNotEnrolled
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    roots,
		ServerName: serverName,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			d.mu.RLock()
			defer d.mu.RUnlock()
			if d.cert == nil {
				return nil, ErrNotEnrolled
			}
			return d.cert, nil
		},
	}, nil
}

// NewSoftwareKey loads or creates an ECDSA P-256 key in dir (file 0600), for
// devices without a TPM. Prefer a TPM key: this one can be copied.
func NewSoftwareKey(dir string) (crypto.Signer, error) {
	path := filepath.Join(dir, SoftKeyFile)
	if b, err := os.ReadFile(path); err == nil {
		blk, _ := pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("devicesdk: %s: no PEM block", path)
		}
		k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("devicesdk: %s: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("devicesdk: %s: not a signing key", path)
		}
		return s, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	return k, nil
}

// Renew asks the enrollment server, over mTLS with the current certificate,
// for a new certificate for the same key, and stores it. The broker
// connection in use is not touched: the next TLS handshake presents the new
// certificate.
func (d *Device) Renew(ctx context.Context) error {
	defer d.closeIdle()
	if !d.Enrolled() {
		return ErrNotEnrolled
	}
	csr, err := d.CSR()
	if err != nil {
		return err
	}
	var resp api.EnrollResponse
	if err := d.post(ctx, api.PathRenew, api.RenewRequest{CSR: csr}, &resp); err != nil {
		return err
	}
	return d.Store(&resp)
}
