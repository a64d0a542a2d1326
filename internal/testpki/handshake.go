package testpki

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"
)

// IssueFor signs a leaf for pub (a key held elsewhere, e.g. in a TPM) with
// ca: name as CN and DNS name, one EKU, valid for an hour either side of
// now. It returns the DER.
func IssueFor(t testing.TB, ca *CA, name string, pub crypto.PublicKey, eku x509.ExtKeyUsage) []byte {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	now := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{eku},
	}, ca.Cert, pub, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TLSHandshake runs a TLS 1.3 handshake over loopback TCP between a Go
// server that requires a client certificate from a throwaway CA and a
// client whose certificate key is signer. It fails the test unless both
// sides complete it at TLS 1.3 and the server saw signer's public key.
func TLSHandshake(t testing.TB, signer crypto.Signer) {
	t.Helper()
	ca := NewCA(t, "throwaway CA")
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	srvKey := NewKey(t)
	serverConf := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{IssueFor(t, ca, "server.test", srvKey.Public(), x509.ExtKeyUsageServerAuth)}, PrivateKey: srvKey}},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}
	clientConf := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		ServerName:   "server.test",
		RootCAs:      pool,
		Certificates: []tls.Certificate{{Certificate: [][]byte{IssueFor(t, ca, "device-1", signer.Public(), x509.ExtKeyUsageClientAuth)}, PrivateKey: signer}},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	type result struct {
		state tls.ConnectionState
		err   error
	}
	srvDone := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvDone <- result{err: err}
			return
		}
		defer c.Close()
		sc := tls.Server(c, serverConf)
		err = sc.HandshakeContext(ctx)
		srvDone <- result{sc.ConnectionState(), err}
	}()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	cc := tls.Client(raw, clientConf)
	if err := cc.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	res := <-srvDone
	if res.err != nil {
		t.Fatalf("server handshake: %v", res.err)
	}
	if res.state.Version != tls.VersionTLS13 || cc.ConnectionState().Version != tls.VersionTLS13 {
		t.Errorf("version = %x (server), %x (client), want TLS 1.3", res.state.Version, cc.ConnectionState().Version)
	}
	if len(res.state.PeerCertificates) == 0 {
		t.Fatal("server saw no client certificate")
	}
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if pk, ok := res.state.PeerCertificates[0].PublicKey.(equaler); !ok || !pk.Equal(signer.Public()) {
		t.Error("server saw a different client key")
	}
}

// NoPrivateKey fails the test if data, raw or any PEM block in it, is a
// private key: a PEM block whose type says PRIVATE, or bytes that parse as
// a key in a form crypto/x509 reads (PKCS#8, SEC 1 EC, PKCS#1). name says
// where data came from.
func NoPrivateKey(t testing.TB, name string, data []byte) {
	t.Helper()
	ders := [][]byte{data}
	for rest := data; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if strings.Contains(blk.Type, "PRIVATE") {
			t.Errorf("%s holds a PEM %q block", name, blk.Type)
		}
		ders = append(ders, blk.Bytes)
	}
	for _, der := range ders {
		if _, err := x509.ParsePKCS8PrivateKey(der); err == nil {
			t.Errorf("%s parses as a PKCS#8 private key", name)
		}
		if _, err := x509.ParseECPrivateKey(der); err == nil {
			t.Errorf("%s parses as an EC private key", name)
		}
		if _, err := x509.ParsePKCS1PrivateKey(der); err == nil {
			t.Errorf("%s parses as a PKCS#1 private key", name)
		}
	}
}
