package server

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"

	"gopkg.in/yaml.v3"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
)

// openCAKey opens the issuing CA's key named by ca_key (default: the data
// directory's ca/issuing.key, which must be 0600). Every failure (wrong
// PIN, missing module, token, TPM or key, a readable key file) stops the
// start with the reference, PIN redacted, and what is wrong.
func openCAKey(cfg Config, l Layout) (keystore.Key, error) {
	if cfg.Only == OnlyBroker {
		// A broker signs nothing: it needs no access to the key's store
		// (an HSM or TPM on the enrollment host).
		iss, err := ca.ReadCertFile(filepath.Join(l.Dir, ca.IssuingCertFile))
		if err != nil {
			return nil, err
		}
		return verifyOnly{pub: iss.PublicKey}, nil
	}
	ref := cfg.CAKey
	if ref == "" {
		ref = "file:" + filepath.Join(l.Dir, ca.IssuingKeyFile)
	}
	k, err := keystore.Open(ref)
	if err != nil && cfg.CAKey == "" && errors.Is(err, keystore.ErrNoKey) {
		return nil, fmt.Errorf("issuing CA key: %w (if it was created in an HSM or TPM with init --ca-key, set ca_key / --ca-key)", err)
	}
	if err != nil {
		return nil, fmt.Errorf("issuing CA key (ca_key / --ca-key): %w", err)
	}
	return k, nil
}

// ocspURLs are the OCSP responder URLs for the AIA of issued certificates:
// ocsp_url, else http://<first name of the server certificate>:<port of
// the bound ocsp_addr>/ocsp when ocsp_addr is set, else none.
func ocspURLs(cfg Config, bound string, server *x509.Certificate) []string {
	if cfg.OCSPURL != "" {
		return []string{cfg.OCSPURL}
	}
	if bound == "" || server == nil {
		return nil
	}
	_, port, err := net.SplitHostPort(bound)
	if err != nil {
		return nil
	}
	host := ""
	switch {
	case len(server.DNSNames) > 0:
		host = server.DNSNames[0]
	case len(server.IPAddresses) > 0:
		host = server.IPAddresses[0].String()
	default:
		return nil
	}
	return []string{(&url.URL{Scheme: "http", Host: net.JoinHostPort(host, port), Path: "/ocsp"}).String()}
}

// verifyOnly stands in for the CA key in a broker-only process: it has the
// issuing CA's public key and refuses to sign.
type verifyOnly struct{ pub crypto.PublicKey }

func (v verifyOnly) Public() crypto.PublicKey { return v.pub }
func (v verifyOnly) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("a broker-only process does not sign with the CA key")
}
func (v verifyOnly) Ref() string   { return "none (broker-only)" }
func (v verifyOnly) Store() string { return "none" }
func (v verifyOnly) Close() error  { return nil }

// rotationKeys makes a rotation create the next issuing key in the store
// of ca_key (a PKCS#11 token, the TPM), and open the keys earlier
// rotations made there; with a file key, keys are files in the data
// directory (ca's default). Close the result to release the keys.
func rotationKeys(cfg Config, o *ca.Options) *keystore.Rotation {
	rot := keystore.NewRotation(cfg.CAKey)
	if cfg.Only != OnlyBroker && !keystore.IsFile(cfg.CAKey) {
		o.NewKey, o.OpenKey = rot.NewKey, rot.OpenKey
	}
	return rot
}

// closeBoth is the CA key that also closes the rotation keys.
type closeBoth struct {
	keystore.Key
	rot *keystore.Rotation
}

func (c closeBoth) Close() error { return errors.Join(c.Key.Close(), c.rot.Close()) }

// loadSigningCA loads the CA of dataDir with its keys from the store
// caKey names, as serve does (cfg ca_key; "": the data directory's key
// file), for a local command that signs. closeKeys releases the store.
func loadSigningCA(dataDir, caKey string) (a *ca.Authority, closeKeys func(), err error) {
	cfg := Config{DataDir: dataDir, CAKey: caKey}
	key, err := openCAKey(cfg, Layout{Dir: dataDir})
	if err != nil {
		return nil, nil, err
	}
	opts := ca.Options{Key: key}
	rot := rotationKeys(cfg, &opts)
	both := closeBoth{key, rot}
	if a, err = ca.Load(dataDir, opts); err != nil {
		both.Close()
		return nil, nil, fmt.Errorf("%w (ca_key %s)", err, key.Ref())
	}
	return a, func() { both.Close() }, nil
}

// ConfiguredCAKey returns ca_key as `fleetgate serve` would read it
// without flags: the environment's FLEETGATE_CA_KEY, else the ca_key of
// the YAML file configPath names (else FLEETGATE_CONFIG's), else "" (the
// data directory's key file). Local commands that sign use it.
func ConfiguredCAKey(configPath string, getenv func(string) string) (string, error) {
	if v := getenv(envName("ca-key")); v != "" {
		return v, nil
	}
	if configPath == "" {
		configPath = getenv(EnvPrefix + "CONFIG")
	}
	if configPath == "" {
		return "", nil
	}
	b, err := os.ReadFile(configPath)
	if err != nil {
		return "", fmt.Errorf("config file: %w", err)
	}
	var c struct {
		CAKey string `yaml:"ca_key"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		return "", fmt.Errorf("%s: %w", configPath, err)
	}
	return c.CAKey, nil
}
