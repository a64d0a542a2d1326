package swtpm

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// Provisioning says how Start manufactures a TPM whose Dir holds none yet:
// how its endorsement key gets a certificate.
type Provisioning int

const (
	// ProvisionSwtpmSetup runs swtpm_setup --create-ek-cert with
	// swtpm_localca: an RSA 2048 EK and a P-384 EK, each with a
	// certificate in NV. It costs two RSA/ECC key generations and several
	// processes per TPM (about 4 TPMs a second on this machine).
	ProvisionSwtpmSetup Provisioning = iota
	// ProvisionECC does from Go what a TPM factory line does: the new
	// TPM creates its P-256 EK (TCG EK Credential Profile low-range
	// template L-2) from its own endorsement seed, the manufacturer signs
	// a certificate for that public key (the profile's SAN, EKU and key
	// usage, as swtpm's), and the certificate is written to NV 0x01c0000a
	// under platform authorization and write-locked. The private part
	// never leaves the TPM; one swtpm process per TPM, no RSA key
	// generation. Devices find the certificate at the standard index.
	ProvisionECC
)

// nvIndexECCP256EKCert is the EK Credential Profile's index of the
// low-range ECC NIST P-256 EK certificate.
const nvIndexECCP256EKCert tpm2.TPMHandle = 0x01c0000a

// nvWriteChunk is below the smallest TPM_PT_NV_BUFFER_MAX in practice.
const nvWriteChunk = 512

// provisionECC manufactures the TPM of stateDir by ProvisionECC and
// returns it running. A marker file beside the state says the TPM is
// being made; it goes once the certificate is written and locked, so a
// failure or a crash leaves no TPM Start would take for a finished one
// (isManufactured).
func provisionECC(ctx context.Context, dir, stateDir string, opts Options, log *slog.Logger) (inst *Instance, err error) {
	mark := provisioningMarker(stateDir)
	if err := os.WriteFile(mark, nil, 0o600); err != nil {
		return nil, fmt.Errorf("swtpm: %w", err)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("swtpm: create state dir: %w", err)
	}
	if inst, err = launch(ctx, dir, stateDir, opts, log); err != nil {
		os.RemoveAll(stateDir)
		return nil, err
	}
	if err := writeECCEKCert(inst.SocketPath(), opts.Manufacturer); err != nil {
		out := inst.Output()
		inst.Stop()
		os.RemoveAll(stateDir)
		return nil, fmt.Errorf("swtpm: provision EK certificate: %w: %w\n%s", ErrSetupFailed, err, out)
	}
	if err := os.Remove(mark); err != nil {
		inst.Stop()
		return nil, fmt.Errorf("swtpm: %w", err)
	}
	return inst, nil
}

// provisioningMarker is the file that says stateDir's TPM is being made.
func provisioningMarker(stateDir string) string { return filepath.Clean(stateDir) + ".provisioning" }

// writeECCEKCert creates the TPM's P-256 EK, has m certify it and writes
// the certificate to its NV index, write-locked.
func writeECCEKCert(sock string, m *Manufacturer) error {
	tr, err := linuxudstpm.Open(sock)
	if err != nil {
		return err
	}
	defer tr.Close()
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(tpm2.ECCEKTemplate),
	}.Execute(tr)
	if err != nil {
		return fmt.Errorf("CreatePrimary(EK): %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tr)
	pubArea, err := cp.OutPublic.Contents()
	if err != nil {
		return err
	}
	pub, err := tpm2.Pub(*pubArea)
	if err != nil {
		return err
	}
	tmpl, err := EKCertTemplate(pub, SWTPMIdentity)
	if err != nil {
		return err
	}
	der, err := m.IssueEKCert(tmpl, pub)
	if err != nil {
		return err
	}
	// The attributes swtpm_setup gives its EK certificate indices: the
	// platform writes once (and locks); anyone reads with the index's
	// empty authValue, the owner and the platform too.
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHPlatform,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: nvIndexECCP256EKCert,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
				NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
			},
			DataSize: uint16(len(der)),
		}),
	}
	if _, err := def.Execute(tr); err != nil {
		return fmt.Errorf("NV_DefineSpace(%#x): %w", uint32(nvIndexECCP256EKCert), err)
	}
	for off := 0; off < len(der); off += nvWriteChunk {
		end := min(off+nvWriteChunk, len(der))
		if _, err := (tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHPlatform,
			NVIndex:    tpm2.NamedHandle{Handle: nvIndexECCP256EKCert, Name: nvName(def)},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}).Execute(tr); err != nil {
			return fmt.Errorf("NV_Write(%#x, offset %d): %w", uint32(nvIndexECCP256EKCert), off, err)
		}
	}
	// The name changes once written (TPMA_NV_WRITTEN): read it back.
	rp, err := tpm2.NVReadPublic{NVIndex: nvIndexECCP256EKCert}.Execute(tr)
	if err != nil {
		return fmt.Errorf("NV_ReadPublic(%#x): %w", uint32(nvIndexECCP256EKCert), err)
	}
	if _, err := (tpm2.NVWriteLock{
		AuthHandle: tpm2.TPMRHPlatform,
		NVIndex:    tpm2.NamedHandle{Handle: nvIndexECCP256EKCert, Name: rp.NVName},
	}).Execute(tr); err != nil {
		return fmt.Errorf("NV_WriteLock(%#x): %w", uint32(nvIndexECCP256EKCert), err)
	}
	return nil
}

// nvName is the name of def's index as defined (not yet written).
func nvName(def tpm2.NVDefineSpace) tpm2.TPM2BName {
	pub, err := def.PublicInfo.Contents()
	if err != nil {
		return tpm2.TPM2BName{}
	}
	n, err := tpm2.NVName(pub)
	if err != nil {
		return tpm2.TPM2BName{}
	}
	return *n
}

func (p Provisioning) String() string {
	switch p {
	case ProvisionSwtpmSetup:
		return "swtpm_setup"
	case ProvisionECC:
		return "ecc"
	}
	return fmt.Sprintf("Provisioning(%d)", int(p))
}
