package tpmkey

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

func TestExplore2(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	inst := swtpm.StartForTest(t, m)
	tp, _ := linuxudstpm.Open(inst.SocketPath())
	rp, _ := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(0x81010016)}.Execute(tp)
	want, _ := rp.OutPublic.Contents()
	wantPt, _ := want.Unique.ECC()
	pol := want.AuthPolicy.Buffer
	for _, n := range []int{0} {
		tmpl := tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgECC,
			NameAlg:          tpm2.TPMAlgSHA384,
			ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, AdminWithPolicy: true, Restricted: true, Decrypt: true},
			AuthPolicy:       tpm2.TPM2BDigest{Buffer: pol},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgAES, KeyBits: tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)), Mode: tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB)},
				Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
				CurveID:   tpm2.TPMECCNistP384,
				KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: make([]byte, n)}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, n)}}),
		}
		r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tmpl)}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := r.OutPublic.Contents()
		pt, _ := got.Unique.ECC()
		fmt.Println(n, bytes.Equal(pt.X.Buffer, wantPt.X.Buffer), bytes.Equal(r.Name.Buffer, rp.Name.Buffer))
		tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(tp)
	}
}

func TestExplore3(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	inst := swtpm.StartForTest(t, m)
	tp, _ := linuxudstpm.Open(inst.SocketPath())
	for i := 0; i < 3; i++ {
		start := time.Now()
		r, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println("rsa ek", time.Since(start))
		tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(tp)
		start = time.Now()
		r, err = tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println("ecc srk", time.Since(start))
		tpm2.FlushContext{FlushHandle: r.ObjectHandle}.Execute(tp)
	}
}
