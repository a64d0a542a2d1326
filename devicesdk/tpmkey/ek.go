package tpmkey

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// NV indices of EK certificates (TCG EK Credential Profile 2.3, 2.2.1.4).
const (
	// NVIndexRSA2048EKCert holds the RSA 2048 EK certificate (low range,
	// template L-1).
	NVIndexRSA2048EKCert tpm2.TPMHandle = 0x01c00002
	// NVIndexECCP256EKCert holds the ECC NIST P-256 EK certificate (low
	// range, template L-2).
	NVIndexECCP256EKCert tpm2.TPMHandle = 0x01c0000a
	// NVIndexECCP384EKCert holds the ECC NIST P-384 EK certificate (high
	// range, template H-3). swtpm writes its ECC EK certificate here.
	NVIndexECCP384EKCert tpm2.TPMHandle = 0x01c00016
)

// ekIndices lists the known EK certificate indices in order of preference:
// RSA first because every verifier supports it.
var ekIndices = []tpm2.TPMHandle{NVIndexRSA2048EKCert, NVIndexECCP256EKCert, NVIndexECCP384EKCert}

// nvChunk is how many bytes one TPM2_NV_Read asks for; below the smallest
// TPM_PT_NV_BUFFER_MAX seen in practice (swtpm and dTPMs: 768 or more).
const nvChunk = 512

// policyBSHA384 is the authPolicy of the high-range SHA-384 EK templates
// (TCG EK Credential Profile 2.3, B.6), as swtpm sets it on its P-384 EK.
var policyBSHA384 = []byte{
	0xB2, 0x6E, 0x7D, 0x28, 0xD1, 0x1A, 0x50, 0xBC, 0x53, 0xD8, 0x82, 0xBC,
	0xF5, 0xFD, 0x3A, 0x1A, 0x07, 0x41, 0x48, 0xBB, 0x35, 0xD3, 0xB4, 0xE4,
	0xCB, 0x1C, 0x0A, 0xD9, 0xBD, 0xE4, 0x19, 0xCA, 0xCB, 0x47, 0xBA, 0x09,
	0x69, 0x96, 0x46, 0x15, 0x0F, 0x9F, 0xC0, 0x00, 0xF3, 0xF8, 0x0E, 0x12,
}

// eccP384EKTemplate is the TCG EK Credential Profile 2.3 high-range ECC NIST
// P-384 template (H-3): SHA-384 name, AES-256-CFB, userWithAuth set (the
// empty authValue authorizes use), and an empty unique field. go-tpm ships
// only the low-range RSA 2048 and P-256 templates.
func eccP384EKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA384,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			AdminWithPolicy:     true,
			Restricted:          true,
			Decrypt:             true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: append([]byte(nil), policyBSHA384...)},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP384,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// ekTemplateFor returns the standard EK template for the key in an EK
// certificate.
func ekTemplateFor(pub crypto.PublicKey) (tpm2.TPMTPublic, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() == 2048 && k.E == 65537 {
			return tpm2.RSAEKTemplate, nil
		}
		return tpm2.TPMTPublic{}, fmt.Errorf("tpmkey: RSA %d-bit, e=%d: %w", k.N.BitLen(), k.E, ErrUnsupportedEK)
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return tpm2.ECCEKTemplate, nil
		case elliptic.P384():
			return eccP384EKTemplate(), nil
		}
		return tpm2.TPMTPublic{}, fmt.Errorf("tpmkey: ECC curve %s: %w", k.Curve.Params().Name, ErrUnsupportedEK)
	default:
		return tpm2.TPMTPublic{}, fmt.Errorf("tpmkey: key type %T: %w", pub, ErrUnsupportedEK)
	}
}

// EK is an endorsement key with its certificate, as found in this TPM.
type EK struct {
	// NVIndex is where the certificate was read from.
	NVIndex tpm2.TPMHandle
	// CertDER is the certificate exactly as DER, without NV padding.
	CertDER []byte
	// Cert is the parsed certificate. It is not verified here; the
	// enrollment server verifies the chain.
	Cert *x509.Certificate
	// Public is the EK public area the TPM produced from the template.
	Public tpm2.TPMTPublic
	// Name is the EK's TPM name.
	Name []byte

	template tpm2.TPMTPublic
}

// EKs reads every EK certificate present in NV, recreates each EK from its
// standard template, and checks that it is the certificate's key. Indices
// that are absent are skipped; it fails with ErrNoEKCertificate if none is
// present.
func (t *TPM) EKs() ([]*EK, error) {
	var eks []*EK
	err := t.do(func(tr transport.TPM) error {
		for _, idx := range ekIndices {
			der, err := readNVCert(tr, idx)
			if errors.Is(err, errNVAbsent) {
				continue
			}
			if err != nil {
				return err
			}
			ek, err := recreateEK(tr, idx, der)
			if err != nil {
				return err
			}
			eks = append(eks, ek)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(eks) == 0 {
		return nil, ErrNoEKCertificate
	}
	return eks, nil
}

// EK returns the preferred EK: RSA 2048 if the TPM has its certificate,
// else ECC P-256, else ECC P-384.
func (t *TPM) EK() (*EK, error) {
	eks, err := t.EKs()
	if err != nil {
		return nil, err
	}
	return eks[0], nil
}

var errNVAbsent = errors.New("NV index absent")

// readNVCert reads an EK certificate from NV and returns the DER actually
// present: NV areas are often larger than the certificate and padded.
func readNVCert(tr transport.TPM, idx tpm2.TPMHandle) ([]byte, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tr)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, errNVAbsent
	}
	if err != nil {
		return nil, fmt.Errorf("tpmkey: tpm2.NVReadPublic(%#x): %w", uint32(idx), err)
	}
	nvPub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpmkey: NV public of %#x: %w: %w", uint32(idx), ErrMalformedResponse, err)
	}
	// The EK certificate indices are readable with their own (empty)
	// authValue (TPMA_NV_AUTHREAD) per the EK Credential Profile.
	h := tpm2.AuthHandle{Handle: idx, Name: rp.NVName, Auth: tpm2.PasswordAuth(nil)}
	data := make([]byte, 0, nvPub.DataSize)
	for off := 0; off < int(nvPub.DataSize); off += nvChunk {
		n := min(nvChunk, int(nvPub.DataSize)-off)
		r, err := tpm2.NVRead{
			AuthHandle: h,
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: rp.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(tr)
		if err != nil {
			return nil, fmt.Errorf("tpmkey: tpm2.NVRead(%#x, offset %d): %w", uint32(idx), off, err)
		}
		data = append(data, r.Data.Buffer...)
	}
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("tpmkey: EK certificate at %#x is not DER: %w", uint32(idx), err)
	}
	return raw.FullBytes, nil
}

// recreateEK derives the EK from the template matching the certificate's
// key and checks that the TPM produced that very key.
func recreateEK(tr transport.TPM, idx tpm2.TPMHandle, der []byte) (*EK, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tpmkey: parse EK certificate at %#x: %w", uint32(idx), err)
	}
	tmpl, err := ekTemplateFor(cert.PublicKey)
	if err != nil {
		return nil, err
	}
	ek := &EK{NVIndex: idx, CertDER: der, Cert: cert, template: tmpl}
	h, pub, name, err := createEK(tr, ek)
	if err != nil {
		return nil, err
	}
	flush(tr, h)
	ek.Public = *pub
	ek.Name = name
	return ek, nil
}

// createEK creates the EK primary and checks it against the certificate.
// The caller flushes the returned handle.
func createEK(tr transport.TPM, ek *EK) (tpm2.TPMHandle, *tpm2.TPMTPublic, []byte, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(ek.template),
	}.Execute(tr)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("tpmkey: tpm2.CreatePrimary(EK): %w", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		flush(tr, rsp.ObjectHandle)
		return 0, nil, nil, fmt.Errorf("tpmkey: EK public: %w: %w", ErrMalformedResponse, err)
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		flush(tr, rsp.ObjectHandle)
		return 0, nil, nil, fmt.Errorf("tpmkey: EK public key: %w: %w", ErrMalformedResponse, err)
	}
	eq, ok := key.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !eq.Equal(ek.Cert.PublicKey) {
		flush(tr, rsp.ObjectHandle)
		return 0, nil, nil, fmt.Errorf("tpmkey: EK at %#x: %w", uint32(ek.NVIndex), ErrEKMismatch)
	}
	return rsp.ObjectHandle, pub, rsp.Name.Buffer, nil
}

// ekAuth returns the session that authorizes the EK for the USER role. The
// low-range templates clear userWithAuth and require
// PolicySecret(TPM_RH_ENDORSEMENT); the high-range ones set userWithAuth, so
// the (empty) authValue suffices.
func ekAuth(tmpl tpm2.TPMTPublic) tpm2.Session {
	if tmpl.ObjectAttributes.UserWithAuth {
		return tpm2.PasswordAuth(nil)
	}
	return tpm2.Policy(tmpl.NameAlg, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: h,
			NonceTPM:      nonceTPM,
		}.Execute(tr)
		if err != nil {
			return fmt.Errorf("tpm2.PolicySecret(endorsement): %w", err)
		}
		return nil
	})
}
