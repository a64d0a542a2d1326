package attest_test

import (
	"crypto"
	"errors"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/google/go-tpm/tpm2"
)

// TestSWTPMEKCertificatesAreEKs: both EK certificates a real swtpm carries
// (RSA with keyEncipherment, ECC P-384 with keyAgreement, the TCG SAN and
// EKU) are accepted, with and without roots, and give swtpm's TPM
// identification.
func TestSWTPMEKCertificatesAreEKs(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	d := newDevice(t, m)
	eks, err := d.tpm.EKs()
	if err != nil {
		t.Fatal(err)
	}
	if len(eks) != 2 {
		t.Fatalf("got %d EK certificates, want 2", len(eks))
	}
	for _, ek := range eks {
		if _, err := attest.VerifyEKCertificate(ek.CertDER, m.RootPool(), time.Now()); err != nil {
			t.Errorf("EK %#x: VerifyEKCertificate: %v", uint32(ek.NVIndex), err)
		}
		_, info, err := attest.ParseEKCertificate(ek.CertDER)
		if err != nil {
			t.Errorf("EK %#x: ParseEKCertificate: %v", uint32(ek.NVIndex), err)
		}
		if info.Manufacturer != "id:00001014" || info.Model != "swtpm" || info.Version == "" {
			t.Errorf("EK %#x: TPM info %+v, want swtpm's", uint32(ek.NVIndex), info)
		}
	}
}

// TestEnrollmentAttacksIssue11 drives a real swtpm as an attacker with root
// on the device would, for the checks issue 11 added.
func TestEnrollmentAttacksIssue11(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	a := newDevice(t, m)
	akA, err := attest.VerifyAKPublic(a.keys.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	tlsKeyA := a.keys.TLSPublicKey()
	certifyTemplate := func(t *testing.T, tmpl tpm2.TPMTPublic) error {
		pub2B, priv2B := createInTPM(t, a, tmpl)
		n := nonce(t)
		info, sig, key := certifyBlob(t, a, pub2B, priv2B, n)
		return attest.VerifyCertify(akA, pub2B, info, sig, n, key)
	}

	tests := []struct {
		name string
		run  func(t *testing.T) error
		want error
	}{
		{
			name: "The device's own certification passes",
			run: func(t *testing.T) error {
				n := nonce(t)
				att, err := a.keys.Attest(n)
				if err != nil {
					t.Fatal(err)
				}
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, att.CertifySignature, n, tlsKeyA)
			},
		},
		{
			name: "A TPM certify signature re-encoded with a leading zero byte in R is refused",
			run: func(t *testing.T) error {
				n := nonce(t)
				att, err := a.keys.Attest(n)
				if err != nil {
					t.Fatal(err)
				}
				sig := reencodeSig(t, att.CertifySignature, func(r, s []byte) ([]byte, []byte) { return padZero(r), s })
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, sig, n, tlsKeyA)
			},
			want: attest.ErrCertifySignature,
		},
		{
			name: "A TPM key whose scheme is ECDSA-SHA384 is refused as TLS key",
			run: func(t *testing.T) error {
				tmpl := tpmkey.TLSKeyTemplate()
				d, _ := tmpl.Parameters.ECCDetail()
				d.Scheme = tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA384})}
				return certifyTemplate(t, tmpl)
			},
			want: attest.ErrKeyType,
		},
		{
			name: "A TPM key with an authPolicy is refused as TLS key",
			run: func(t *testing.T) error {
				pc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
				if err != nil {
					t.Fatal(err)
				}
				if err := (tpm2.PolicyCommandCode{Code: tpm2.TPMCCSign}).Update(pc); err != nil {
					t.Fatal(err)
				}
				tmpl := tpmkey.TLSKeyTemplate()
				tmpl.AuthPolicy = tpm2.TPM2BDigest{Buffer: pc.Hash().Digest}
				return certifyTemplate(t, tmpl)
			},
			want: attest.ErrKeyPolicy,
		},
		{
			name: "A TPM key created with an authPolicy is refused as AK",
			run: func(t *testing.T) error {
				tmpl := tpmkey.AKTemplate()
				tmpl.AuthPolicy = tpm2.TPM2BDigest{Buffer: make([]byte, 32)}
				tmpl.AuthPolicy.Buffer[0] = 1
				pub2B, _ := createInTPM(t, a, tmpl)
				_, err := attest.VerifyAK(pub2B)
				return err
			},
			want: attest.ErrAKPolicy,
		},
		{
			name: "A primary key of the NULL hierarchy is refused as TLS key",
			run: func(t *testing.T) error {
				tr := rawTPM(t, a)
				var ak tpm2.AuthHandle
				withSRK(t, tr, func(srk tpm2.AuthHandle) { ak = loadAK(t, tr, srk, a) })
				rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHNull, InPublic: tpm2.New2B(tpmkey.TLSKeyTemplate())}.Execute(tr)
				if err != nil {
					t.Fatalf("CreatePrimary(NULL): %v", err)
				}
				flushLater(t, tr, rsp.ObjectHandle)
				n := nonce(t)
				info, sig := certify(t, tr, tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}, ak, n)
				pub, err := rsp.OutPublic.Contents()
				if err != nil {
					t.Fatal(err)
				}
				key, err := tpm2.Pub(*pub)
				if err != nil {
					t.Fatal(err)
				}
				return attest.VerifyCertify(akA, tpm2.Marshal(rsp.OutPublic), info, sig, n, key.(crypto.PublicKey))
			},
			want: attest.ErrCertifyQualifiedName,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			t.Logf("err: %v", err)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("err = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}
