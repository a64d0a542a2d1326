package natsnode

// The cluster CA (docs/cluster.md, "Securing NATS"): a CA of its own,
// created by `fleetgate init` beside the device PKI and copied with the
// data directory to every node. Each node issues itself, in memory, a
// route certificate naming it; routes are mutual TLS 1.3 verified against
// this CA only. A device or operator certificate of the fleetgate CA can
// therefore never join the NATS cluster.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/internal/atomicfile"
)

// Files of the cluster CA in its directory (<data-dir>/cluster).
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca.key"
)

// RouteServerName is the name every node's certificate carries besides
// its own, and the name a route's TLS client verifies: routes are dialled
// by address, and any node of the cluster may answer on it.
const RouteServerName = "fleetgate-nats-route"

// nodeCertLifetime is the validity of a node's certificate; it is
// reissued in memory when less than a tenth of it remains.
const nodeCertLifetime = 90 * 24 * time.Hour

// ClusterCA is the cluster CA, with its key: every node holds it, to issue
// its own certificate.
type ClusterCA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
	now  func() time.Time
}

// CAExists reports whether dir holds a cluster CA certificate.
func CAExists(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, CACertFile))
	return err == nil
}

// CreateCA creates the cluster CA in dir (P-256, ten years): the key 0600,
// then the certificate. It never overwrites one.
func CreateCA(dir string) (*ClusterCA, error) {
	if CAExists(dir) {
		return nil, fmt.Errorf("natsnode: %s already holds a cluster CA; it is never overwritten", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: "fleetgate NATS cluster CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0), IsCA: true, BasicConstraintsValid: true,
		MaxPathLenZero: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, CACertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return nil, err
	}
	return LoadCA(dir)
}

// LoadCA reads the cluster CA of dir. Its key must be readable by its
// owner only.
func LoadCA(dir string) (*ClusterCA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	cb, err := os.ReadFile(certPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("natsnode: no cluster CA (%s): run `fleetgate init --data-dir DIR` once on one node (it adds the cluster CA to an existing data directory) and copy DIR/cluster to every node", certPath)
	}
	if err != nil {
		return nil, fmt.Errorf("natsnode: cluster CA: %w", err)
	}
	fi, err := os.Stat(keyPath)
	if err != nil {
		return nil, fmt.Errorf("natsnode: cluster CA key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("natsnode: cluster CA key %s has mode %04o; it must be 0600", keyPath, fi.Mode().Perm())
	}
	kb, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("natsnode: cluster CA key: %w", err)
	}
	cblk, _ := pem.Decode(cb)
	kblk, _ := pem.Decode(kb)
	if cblk == nil || kblk == nil {
		return nil, fmt.Errorf("natsnode: cluster CA in %s: not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("natsnode: %s: %w", certPath, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("natsnode: %s: %w", keyPath, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("natsnode: %s is not the key of %s", keyPath, certPath)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &ClusterCA{Cert: cert, key: key, pool: pool, now: time.Now}, nil
}

// Pool is the CA alone, the only root a route is verified against.
func (ca *ClusterCA) Pool() *x509.CertPool { return ca.pool }

// issue issues a certificate for node (CN and DNS names node and
// RouteServerName, and hosts: IP addresses or DNS names clients dial), for
// TLS server and client.
func (ca *ClusterCA) issue(node string, hosts []string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := ca.now()
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: node, OrganizationalUnit: []string{"fleetgate NATS node"}},
		DNSNames: []string{node, RouteServerName}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(nodeCertLifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !ip.IsUnspecified() {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if h != "" && !slices.Contains(tmpl.DNSNames, h) {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// NodeTLS is node's TLS for its routes (mutual, TLS 1.3, the cluster CA
// only) and its client listener (server side; hosts are the addresses or
// names its clients dial, unspecified addresses left out). The node's
// certificate lives in memory only and is reissued before it expires.
func (ca *ClusterCA) NodeTLS(node string, hosts ...string) (*tls.Config, error) {
	nc := &nodeCert{ca: ca, node: node, hosts: hosts}
	if _, err := nc.get(); err != nil {
		return nil, fmt.Errorf("natsnode: certificate of node %s: %w", node, err)
	}
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetCertificate:       func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nc.get() },
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return nc.get() },
		RootCAs:              ca.pool,
		ClientCAs:            ca.pool,
		ClientAuth:           tls.RequireAndVerifyClientCert,
		ServerName:           RouteServerName,
	}, nil
}

type nodeCert struct {
	ca    *ClusterCA
	node  string
	hosts []string
	mu    sync.Mutex
	cert  *tls.Certificate
}

func (n *nodeCert) get() (*tls.Certificate, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cert != nil && n.ca.now().Before(n.cert.Leaf.NotAfter.Add(-nodeCertLifetime/10)) {
		return n.cert, nil
	}
	c, err := n.ca.issue(n.node, n.hosts)
	if err != nil {
		return nil, err
	}
	n.cert = c
	return c, nil
}

func serial() *big.Int {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return s.Add(s, big.NewInt(1))
}
