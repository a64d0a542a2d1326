package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestByteCacheIsBoundedAndExact(t *testing.T) {
	c := newByteCache[int](4)
	for i := range 20 {
		c.put([]byte(fmt.Sprint("key-", i)), i)
		if c.len() > 4 {
			t.Fatalf("len = %d, bound 4", c.len())
		}
	}
	c.put([]byte("abc"), 1)
	if _, ok := c.get([]byte("abcd")); ok {
		t.Fatal("a longer key was found")
	}
	if _, ok := c.get([]byte("ab")); ok {
		t.Fatal("a prefix was found")
	}
	if v, ok := c.get([]byte("abc")); !ok || v != 1 {
		t.Fatalf("get = %v %v", v, ok)
	}
}

// The name computed from the canonical bytes is what tpm2.ObjectName computes
// from the decoded structure, for every accepted name algorithm.
func TestDecodedNameIsTheObjectName(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, alg := range []tpm2.TPMIAlgHash{tpm2.TPMAlgSHA256, tpm2.TPMAlgSHA384, tpm2.TPMAlgSHA512} {
		pub := tpm2.TPMTPublic{
			Type:    tpm2.TPMAlgECC,
			NameAlg: alg,
			ObjectAttributes: tpm2.TPMAObject{
				FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true,
			},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
				CurveID: tpm2.TPMECCNistP256,
				KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
				X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
				Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
			}),
		}
		b := tpm2.Marshal(tpm2.New2B(pub))
		for range 2 { // decoded, then from the cache
			pa, err := decodePublic("test", b)
			if err != nil {
				t.Fatal(err)
			}
			want, err := tpm2.ObjectName(pa.pub)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pa.name, want.Buffer) {
				t.Fatalf("name alg %#x: name %x, tpm2.ObjectName %x", alg, pa.name, want.Buffer)
			}
		}
	}
	// A name algorithm that is not accepted has no name.
	if n := nameOfBytes(tpm2.TPMAlgSHA1, []byte("x")); n != nil {
		t.Fatalf("SHA-1 name %x", n)
	}
}

// A verified AK is answered from the cache only for the same bytes: a
// public area differing in one attribute is checked in full.
func TestVerifyAKCacheIsByExactBytes(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ak := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
			Restricted: true, SignEncrypt: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
		}),
	}
	good := tpm2.Marshal(tpm2.New2B(ak))
	a1, err := VerifyAK(good)
	if err != nil {
		t.Fatal(err)
	}
	a2, err := VerifyAK(good)
	if err != nil || a2 != a1 {
		t.Fatalf("second VerifyAK: %v, cached %t", err, a2 == a1)
	}
	notRestricted := ak
	notRestricted.ObjectAttributes.Restricted = false
	if _, err := VerifyAK(tpm2.Marshal(tpm2.New2B(notRestricted))); err == nil {
		t.Fatal("a non-restricted AK was accepted after a restricted one with the same key")
	}
	if _, err := VerifyAK(append(bytes.Clone(good), 0)); err == nil {
		t.Fatal("trailing data was accepted after the same AK without it")
	}
}
