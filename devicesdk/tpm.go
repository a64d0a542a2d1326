package devicesdk

import (
	"context"
	"crypto"
	"errors"
	"fmt"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
)

// ErrKeyNotTPM means EnrollTPM was given keys whose TLS key is not the
// Device's Config.Key: the certificate would be for another key.
var ErrKeyNotTPM = errors.New("devicesdk: Config.Key is not the TPM keys' TLS key")

// EnrollTPM enrolls the device by TPM attestation and stores the certificate
// chain. Two round trips:
//
//  1. POST the EK certificate and the AK public area; the server answers a
//     credential encrypted to the EK for the AK, and a nonce.
//  2. Recover the secret in the TPM (TPM2_ActivateCredential), have the AK
//     certify the TLS key with the nonce (TPM2_Certify), sign a CSR with the
//     TLS key (in the TPM), and POST all of it; the server answers the
//     certificate chain.
//
// The Device's Config.Key must be keys.Signer(). Under the manufacturer
// policy the device ID must be api.AutoDeviceID of the EK, unless the EK was
// registered with another ID. Errors from the server are *api.Error with the
// server's code.
func (d *Device) EnrollTPM(ctx context.Context, keys *tpmkey.Keys) error {
	defer d.closeIdle()
	type eq interface{ Equal(crypto.PublicKey) bool }
	if k, ok := d.cfg.Key.Public().(eq); !ok || !k.Equal(keys.TLSPublicKey()) {
		return ErrKeyNotTPM
	}
	ek := keys.EK()
	if ek == nil || len(ek.CertDER) == 0 {
		return fmt.Errorf("devicesdk: enroll TPM: %w", tpmkey.ErrNoEKCertificate)
	}
	var ch api.TPMChallengeResponse
	if err := d.post(ctx, api.PathTPMChallenge, api.TPMChallengeRequest{
		DeviceID: d.cfg.DeviceID, EKCert: ek.CertDER, AKPublic: keys.AKPublic(),
	}, &ch); err != nil {
		return err
	}
	secret, err := keys.ActivateCredential(ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		return fmt.Errorf("devicesdk: enroll TPM: %w", err)
	}
	att, err := keys.Attest(ch.Nonce)
	if err != nil {
		return fmt.Errorf("devicesdk: enroll TPM: %w", err)
	}
	csr, err := d.CSR()
	if err != nil {
		return err
	}
	var resp api.EnrollResponse
	if err := d.post(ctx, api.PathTPMComplete, api.TPMCompleteRequest{
		ChallengeID: ch.ChallengeID, Secret: secret,
		TLSPublic: att.TLSPublic, CertifyInfo: att.CertifyInfo, CertifySignature: att.CertifySignature,
		CSR: csr,
	}, &resp); err != nil {
		return err
	}
	return d.Store(&resp)
}
