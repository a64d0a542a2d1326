package tpmkey

import (
	"crypto/x509"
	"fmt"
	"testing"

	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

func TestExplore(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	inst := swtpm.StartForTest(t, m)
	tp, err := linuxudstpm.Open(inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []tpm2.TPMHandle{0x81010001, 0x81010016} {
		rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tp)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := rp.OutPublic.Contents()
		fmt.Printf("%#x: %+v\n", h, pub.ObjectAttributes)
		fmt.Printf("nameAlg %v policy %x\n", pub.NameAlg, pub.AuthPolicy.Buffer)
		if e, err := pub.Parameters.ECCDetail(); err == nil {
			fmt.Printf("ecc %+v\n", e)
			k, _ := e.Symmetric.KeyBits.AES()
			fmt.Printf("aes %v\n", *k)
		}
		if e, err := pub.Parameters.RSADetail(); err == nil {
			fmt.Printf("rsa %+v\n", e)
		}
	}
	for _, idx := range []tpm2.TPMHandle{0x01c00002, 0x01c0000a, 0x01c00016} {
		rp, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tp)
		if err != nil {
			fmt.Println(idx, err)
			continue
		}
		nv, _ := rp.NVPublic.Contents()
		fmt.Printf("nv %#x size %d attrs %+v\n", idx, nv.DataSize, nv.Attributes)
		var data []byte
		for off := 0; off < int(nv.DataSize); off += 512 {
			n := min(512, int(nv.DataSize)-off)
			r, err := tpm2.NVRead{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(idx), Name: rp.NVName, Auth: tpm2.PasswordAuth(nil)}, NVIndex: tpm2.NamedHandle{Handle: idx, Name: rp.NVName}, Size: uint16(n), Offset: uint16(off)}.Execute(tp)
			if err != nil {
				t.Fatal(err)
			}
			data = append(data, r.Data.Buffer...)
		}
		c, err := x509.ParseCertificate(data)
		fmt.Println(len(data), err)
		if c != nil {
			fmt.Println(c.Subject, c.Issuer, c.SerialNumber, c.NotAfter, c.PublicKeyAlgorithm, c.UnhandledCriticalExtensions, c.UnknownExtKeyUsage)
			for _, e := range c.Extensions {
				fmt.Printf("  ext %v crit=%v %x\n", e.Id, e.Critical, e.Value)
			}
		}
	}
}
