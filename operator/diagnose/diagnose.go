// Package diagnose says, in plain words, why fleetgate's broker would
// refuse a client certificate. It runs the broker's own checks, in the
// broker's order, with the broker's inputs: first what crypto/tls does in
// the handshake (x509 verification against the broker's client CAs with
// the client-auth usage), then the directory's check that crypto/tls runs
// next (VerifyConnection: directory.Verify: identity, serial, revocation,
// expiry, device state), then the proof of the key (CertificateVerify: its
// algorithm; its match with the certificate is KeyChecks'), then the
// CONNECT's (client ID = identity). The refusal reason it reports
// is the one the broker logs and counts, so the two cannot disagree; the
// finer Problem and the words around it are for the operator.
//
// The server runs it (POST /v1/admin/diagnose) because only the server has
// the broker's client CAs and directory; `fleetgate diagnose` prints it and
// adds the checks that need the private key, which never leaves the
// operator's machine (KeyChecks).
package diagnose

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Env is what the broker checks a certificate with.
type Env struct {
	// ClientCAs is the broker's pool of client CAs (tls.Config.ClientCAs).
	ClientCAs *x509.CertPool
	// Anchors are the certificates of that pool, to name them.
	Anchors []*x509.Certificate
	// Others are CA certificates of this server the broker does not accept
	// device certificates from (the root CA), to recognise them.
	Others      []*x509.Certificate
	TrustDomain string
	Directory   *directory.Directory
	Now         time.Time
}

// Problems (api.DiagnoseReport.Problem).
const (
	ProblemNoCert           = "no_cert"
	ProblemChainIncomplete  = "chain_incomplete"
	ProblemIssuerUntrusted  = "issuer_untrusted"
	ProblemIssuerOtherKey   = "issuer_other_key"
	ProblemIssuerIsRoot     = "issuer_is_root"
	ProblemNotYetValid      = "not_yet_valid"
	ProblemExpired          = "expired"
	ProblemWrongEKU         = "wrong_eku"
	ProblemInvalid          = "invalid_cert"
	ProblemKeyAlgorithm     = "key_algorithm"
	ProblemNoIdentity       = "no_identity"
	ProblemOtherDevice      = "other_device"
	ProblemClientID         = "client_id"
	ProblemUnknownSerial    = "unknown_serial"
	ProblemIdentityMismatch = "identity_mismatch"
	ProblemCertRevoked      = "cert_revoked"
	ProblemDeviceRevoked    = "device_revoked"
	ProblemDeviceSuspended  = "device_suspended"
	ProblemUnknownDevice    = "unknown_device"
	ProblemNotEnrolled      = "not_enrolled"
	// ProblemKeyMismatch is found by KeyChecks (the key is the operator's).
	ProblemKeyMismatch = "key_mismatch"
)

// report collects checks; the first failing one decides.
type report struct{ api.DiagnoseReport }

func (r *report) ok(name, detail string, args ...any) {
	r.Checks = append(r.Checks, api.DiagnoseCheck{Name: name, OK: true, Detail: fmt.Sprintf(detail, args...)})
}

// fail records a failing check; the first one sets the verdict.
func (r *report) fail(name string, reason fleet.Reason, problem, detail string, args ...any) {
	d := fmt.Sprintf(detail, args...)
	r.Checks = append(r.Checks, api.DiagnoseCheck{Name: name, Detail: d})
	if r.Problem == "" {
		r.Accepted, r.Reason, r.Problem, r.Summary = false, string(reason), problem, d
	}
}

// Certificate checks chain (the device's certificate, then the CA
// certificates it sends) as the broker would, for a device that should be
// deviceID ("": whatever the certificate says) connecting with MQTT client
// ID clientID ("": its identity's name).
func Certificate(env Env, chain []*x509.Certificate, deviceID, clientID string) api.DiagnoseReport {
	r := &report{api.DiagnoseReport{Accepted: true, ServerTime: env.Now.UTC()}}
	for _, a := range env.Anchors {
		r.ClientCAs = append(r.ClientCAs, a.Subject.String())
	}
	if len(chain) == 0 {
		r.fail("certificate", fleet.ReasonNoCert, ProblemNoCert, "No certificate: the broker requires a client certificate (mutual TLS).")
		return r.DiagnoseReport
	}
	leaf := chain[0]
	r.Subject, r.Issuer, r.Serial = leaf.Subject.String(), leaf.Issuer.String(), fleet.SerialString(leaf.SerialNumber)
	r.NotBefore, r.NotAfter, r.KeyAlg = leaf.NotBefore.UTC(), leaf.NotAfter.UTC(), KeyAlgorithm(leaf.PublicKey)

	// 1. The TLS handshake: crypto/tls verifies the chain against the
	// client CAs, for client authentication, at the server's time.
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, verr := leaf.Verify(x509.VerifyOptions{Roots: env.ClientCAs, Intermediates: inter, CurrentTime: env.Now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	validity(r, leaf, env.Now)
	if verr != nil {
		tlsFailure(r, env, chain, verr)
	} else {
		r.ok("chain", "Chains to the broker's client CA %s.", strings.Join(r.ClientCAs, ", "))
		r.ok("key usage", "Allows TLS client authentication.")
	}
	if r.Problem != "" {
		// The handshake fails: the directory is never asked. Still say
		// what it would say, for the next fix.
		r.Checks = append(r.Checks, api.DiagnoseCheck{Name: "registry", OK: true, Detail: "Not reached: the TLS handshake fails first."})
		if _, _, err := env.Directory.Verify(leaf, env.TrustDomain, env.Now); err != nil {
			r.Checks[len(r.Checks)-1] = api.DiagnoseCheck{Name: "registry (after the handshake)", Detail: "Also: " + directoryWords(env, leaf, err)}
		}
		return r.DiagnoseReport
	}

	// 2. The directory (VerifyConnection in the handshake, and again at
	// CONNECT): identity, serial, revocation, expiry, device state.
	id, reason, err := env.Directory.Verify(leaf, env.TrustDomain, env.Now)
	if id.Name != "" {
		r.Identity = id.URI(env.TrustDomain).String()
	}
	if err != nil {
		problem := directoryProblem(err)
		if problem == ProblemCertRevoked && deviceRevoked(env, leaf) {
			problem = ProblemDeviceRevoked
		}
		r.fail("registry", reason, problem, "%s", directoryWords(env, leaf, err))
		return r.DiagnoseReport
	}
	r.ok("identity", "The certificate's identity is %s.", r.Identity)
	r.ok("registry", "The registry issued serial %s to %s; not revoked; the device is active.", r.Serial, id)

	// The device proves it holds the key (TLS 1.3 CertificateVerify,
	// which crypto/tls reads after VerifyConnection): the key's algorithm
	// must have a signature scheme. (Whether the key is the certificate's
	// is KeyChecks', on the operator's machine.)
	if msg, ok := keySupported(leaf.PublicKey); !ok {
		r.fail("key algorithm", fleet.ReasonHandshakeFailed, ProblemKeyAlgorithm, "%s", msg)
		return r.DiagnoseReport
	}
	r.ok("key algorithm", "%s", keyWords(leaf.PublicKey))

	// 3. CONNECT: the client ID must be the identity's name.
	switch {
	case deviceID != "" && deviceID != id.Name:
		r.fail("client ID", fleet.ReasonClientIDDiffer, ProblemOtherDevice,
			"The certificate is %s's (%s), not %s's: the broker takes the identity from the certificate, so %s connecting with it (client ID %s) is refused. Install %s's own certificate on it.",
			id.Name, r.Identity, deviceID, deviceID, deviceID, deviceID)
	case clientID != "" && clientID != id.Name:
		r.fail("client ID", fleet.ReasonClientIDDiffer, ProblemClientID,
			"The MQTT client ID must be the identity's name %q, not %q (CONNACK: identifier rejected).", id.Name, clientID)
	default:
		r.ok("client ID", "Connect with client ID %q.", id.Name)
	}
	if r.Accepted {
		r.Summary = fmt.Sprintf("The broker accepts this certificate: %s, serial %s, valid until %s.", id, r.Serial, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return r.DiagnoseReport
}

// validity adds the validity check with the clock skew in words.
func validity(r *report, leaf *x509.Certificate, now time.Time) {
	switch {
	case now.Before(leaf.NotBefore):
		d := leaf.NotBefore.Sub(now).Round(time.Second)
		r.fail("validity", fleet.ReasonExpired, ProblemNotYetValid,
			"Not valid yet: valid from %s, %s after the server's clock (%s). The clock of the machine that issued it is %s ahead, or the server's is behind: check NTP on both (the broker counts this as %q).",
			leaf.NotBefore.UTC().Format(time.RFC3339), d, now.UTC().Format(time.RFC3339), d, fleet.ReasonExpired)
	case now.After(leaf.NotAfter):
		d := now.Sub(leaf.NotAfter).Round(time.Second)
		r.fail("validity", fleet.ReasonExpired, ProblemExpired,
			"Expired %s ago, at %s (server clock %s). The device did not renew in time: enroll it again (a new token, or TPM attestation), or, if its clock is far behind, fix its clock and renew.",
			d, leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	default:
		r.ok("validity", "Valid from %s until %s (%s left on the server's clock).", leaf.NotBefore.UTC().Format(time.RFC3339),
			leaf.NotAfter.UTC().Format(time.RFC3339), leaf.NotAfter.Sub(now).Round(time.Minute))
	}
}

// tlsFailure explains an x509 verification failure, with the reason the
// broker's listener gives it (handshakeReason).
func tlsFailure(r *report, env Env, chain []*x509.Certificate, err error) {
	leaf := chain[0]
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	switch {
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		// validity() said it in words.
		if r.Problem == "" {
			r.fail("validity", fleet.ReasonExpired, ProblemExpired, "A certificate of the chain is outside its validity: %v.", err)
		}
	case errors.As(err, &inv) && inv.Reason == x509.IncompatibleUsage:
		r.ok("chain", "Chains to the broker's client CA %s.", strings.Join(r.ClientCAs, ", "))
		r.fail("key usage", fleet.ReasonWrongKeyUsage, ProblemWrongEKU,
			"Wrong extended key usage %s: the broker requires TLS client authentication (clientAuth); this certificate is for something else (a server certificate?). Use the certificate fleetgate issued to the device.", ekuWords(leaf))
	case errors.As(err, &ua):
		chainFailure(r, env, chain)
	case errors.As(err, &inv):
		r.fail("chain", fleet.ReasonInvalidCert, ProblemInvalid, "The chain is invalid: %v.", err)
	default:
		r.fail("chain", fleet.ReasonUnknownCA, ProblemIssuerUntrusted, "The chain does not verify: %v.", err)
	}
}

// chainFailure says why the chain reaches no client CA.
func chainFailure(r *report, env Env, chain []*x509.Certificate) {
	top := chain[len(chain)-1] // the last certificate sent; its issuer is missing or untrusted
	anchors := strings.Join(r.ClientCAs, ", ")
	for _, a := range env.Anchors {
		if bytes.Equal(top.RawIssuer, a.RawSubject) && top.CheckSignatureFrom(a) != nil {
			r.fail("chain", fleet.ReasonUnknownCA, ProblemIssuerOtherKey,
				"Issued by a CA named %q, like this broker's, but signed with another key: a certificate of another fleetgate installation, or of this one before its CA was created again. Enroll the device with this server.", top.Issuer.String())
			return
		}
	}
	for _, o := range env.Others {
		if top.CheckSignatureFrom(o) == nil {
			r.fail("chain", fleet.ReasonUnknownCA, ProblemIssuerIsRoot,
				"Signed by %q, which the broker does not accept for client certificates: it accepts only certificates issued by %s.", o.Subject.String(), anchors)
			return
		}
	}
	if bytes.Equal(top.RawIssuer, top.RawSubject) || len(chain) > 1 {
		root := top.Subject.String()
		if !bytes.Equal(top.RawIssuer, top.RawSubject) {
			root = top.Issuer.String()
		}
		r.fail("chain", fleet.ReasonUnknownCA, ProblemIssuerUntrusted,
			"Issuer not trusted: the chain leads to %q, which is not a client CA of this broker (%s). The certificate was issued by another CA: enroll the device with this server.", root, anchors)
		return
	}
	r.fail("chain", fleet.ReasonUnknownCA, ProblemChainIncomplete,
		"Chain incomplete or issuer not trusted: the issuer %q was not sent with the certificate and is not a client CA of this broker (%s). If %q is an intermediate CA below it, the device must send it after its own certificate (mosquitto --cert sends the whole file; openssl s_client needs -cert_chain); otherwise the certificate is another CA's.",
		leaf0Issuer(chain), anchors, leaf0Issuer(chain))
}

func leaf0Issuer(chain []*x509.Certificate) string { return chain[0].Issuer.String() }

func ekuWords(c *x509.Certificate) string {
	names := map[x509.ExtKeyUsage]string{x509.ExtKeyUsageServerAuth: "serverAuth", x509.ExtKeyUsageClientAuth: "clientAuth",
		x509.ExtKeyUsageCodeSigning: "codeSigning", x509.ExtKeyUsageEmailProtection: "emailProtection", x509.ExtKeyUsageOCSPSigning: "OCSPSigning"}
	var out []string
	for _, u := range c.ExtKeyUsage {
		if n, ok := names[u]; ok {
			out = append(out, n)
		} else {
			out = append(out, fmt.Sprintf("%d", u))
		}
	}
	for _, o := range c.UnknownExtKeyUsage {
		out = append(out, o.String())
	}
	if len(out) == 0 {
		return "(none)"
	}
	return "[" + strings.Join(out, ", ") + "]"
}

func directoryProblem(err error) string {
	switch {
	case errors.Is(err, directory.ErrUnknownSerial):
		return ProblemUnknownSerial
	case errors.Is(err, directory.ErrIdentityDiffer):
		return ProblemIdentityMismatch
	case errors.Is(err, directory.ErrSuspended):
		return ProblemDeviceSuspended
	case errors.Is(err, directory.ErrUnknownDevice):
		return ProblemUnknownDevice
	case errors.Is(err, directory.ErrExpired):
		return ProblemExpired
	case errors.Is(err, directory.ErrRevoked):
		return ProblemCertRevoked // or the device's: Certificate tells them apart
	case errors.Is(err, directory.ErrNoCert):
		return ProblemNoCert
	}
	return ProblemNoIdentity
}

// directoryWords says a refusal of directory.Verify in plain words.
func directoryWords(env Env, leaf *x509.Certificate, err error) string {
	serial := fleet.SerialString(leaf.SerialNumber)
	id, idErr := identity.FromCertificate(leaf, env.TrustDomain)
	switch {
	case idErr != nil:
		uris := make([]string, 0, len(leaf.URIs))
		for _, u := range leaf.URIs {
			uris = append(uris, u.String())
		}
		if len(uris) == 0 {
			return fmt.Sprintf("Identity URI missing: the certificate has no URI SAN spiffe://%s/device/<id>; the broker takes the identity from it (%v). It was not issued by fleetgate's enrollment.", env.TrustDomain, idErr)
		}
		return fmt.Sprintf("No valid identity: URI SAN %s is not spiffe://%s/<role>/<name> (%v).", strings.Join(uris, ", "), env.TrustDomain, idErr)
	case errors.Is(err, directory.ErrUnknownSerial):
		return fmt.Sprintf("Serial %s is unknown to the registry: this server never issued it (a certificate of another installation with the same CA, or a registry restored from an older backup). Enroll the device again.", serial)
	case errors.Is(err, directory.ErrIdentityDiffer):
		st, _ := env.Directory.CertStatus(serial)
		return fmt.Sprintf("Serial %s was issued to %s, but the certificate names %s: it was not issued as presented.", serial, st.Identity, id)
	case errors.Is(err, directory.ErrRevoked):
		if !deviceRevoked(env, leaf) {
			return fmt.Sprintf("Certificate serial %s of %s is revoked (`fleetgate certificates revoke` or a device revoke). The device needs a new certificate, or stays out if that was meant.", serial, id)
		}
		return fmt.Sprintf("Device %s is revoked: every certificate of it is refused, for good. `fleetgate audit --device %s` says who revoked it and why.", id.Name, id.Name)
	case errors.Is(err, directory.ErrSuspended):
		return fmt.Sprintf("Device %s is suspended: it is refused until `fleetgate devices resume %s`. `fleetgate audit --device %s` says who suspended it and why.", id.Name, id.Name, id.Name)
	case errors.Is(err, directory.ErrUnknownDevice):
		ds, ok := env.Directory.DeviceStatus(id.Name)
		if ok {
			return fmt.Sprintf("Device %s is %s, not active.", id.Name, ds.State)
		}
		return fmt.Sprintf("Device %s is unknown to the registry.", id.Name)
	case errors.Is(err, directory.ErrExpired):
		return fmt.Sprintf("Expired at %s (server clock %s).", leaf.NotAfter.UTC().Format(time.RFC3339), env.Now.UTC().Format(time.RFC3339))
	}
	return err.Error()
}

// deviceRevoked: the certificate is a device's and the device is revoked
// (which revokes its certificates too: the device is what to tell).
func deviceRevoked(env Env, leaf *x509.Certificate) bool {
	id, err := identity.FromCertificate(leaf, env.TrustDomain)
	if err != nil || id.Role != identity.RoleDevice {
		return false
	}
	ds, ok := env.Directory.DeviceStatus(id.Name)
	return ok && ds.State == fleet.StateRevoked
}

// KeyAlgorithm names a public key's algorithm: "ECDSA P-256", "RSA 2048".
func KeyAlgorithm(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return fmt.Sprintf("%T", pub)
}

// keySupported says whether the broker's TLS 1.3 handshake can verify a
// signature by this key (crypto/tls: ECDSA on P-256/384/521, RSA-PSS with at
// least 1024 bits, Ed25519), and whether fleetgate's enrollment would have
// issued it (P-256, P-384, RSA from 2048 bits).
func keySupported(pub any) (string, bool) {
	return keyVerdict(pub)
}

func keyWords(pub any) string {
	msg, _ := keyVerdict(pub)
	return msg
}

func keyVerdict(pub any) (string, bool) {
	alg := KeyAlgorithm(pub)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return alg + ": supported.", true
		case elliptic.P521():
			return alg + ": the broker accepts it; fleetgate's enrollment issues for P-256 and P-384 only.", true
		}
		return alg + ": TLS 1.3 has no signature scheme for this curve; the handshake fails. Use ECDSA P-256.", false
	case *rsa.PublicKey:
		if k.N.BitLen() < 1024 {
			return alg + ": too small; the broker's TLS refuses RSA keys under 1024 bits. Use ECDSA P-256.", false
		}
		if k.N.BitLen() < 2048 {
			return alg + ": weak; the broker accepts it, but fleetgate's enrollment requires 2048 bits.", true
		}
		return alg + ": supported.", true
	case ed25519.PublicKey:
		return alg + ": the broker accepts it; fleetgate's enrollment issues for ECDSA and RSA only.", true
	}
	return alg + ": not a key type TLS client authentication supports.", false
}

// KeyChecks are the checks that need the private key (the CLI's, locally):
// the key must be the certificate's, or the device cannot prove it holds
// the certificate and the handshake fails.
func KeyChecks(leaf *x509.Certificate, key crypto.Signer) api.DiagnoseCheck {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if e, ok := key.Public().(equaler); ok && e.Equal(leaf.PublicKey) {
		return api.DiagnoseCheck{Name: "private key", OK: true, Detail: fmt.Sprintf("The key (%s) is the certificate's.", KeyAlgorithm(key.Public()))}
	}
	return api.DiagnoseCheck{Name: "private key", Detail: fmt.Sprintf(
		"The key (%s) does not belong to the certificate (%s): the device cannot prove it holds the certificate and the broker refuses the handshake (%q). Pair the certificate with the key its CSR was made with.",
		KeyAlgorithm(key.Public()), KeyAlgorithm(leaf.PublicKey), fleet.ReasonHandshakeFailed)}
}
