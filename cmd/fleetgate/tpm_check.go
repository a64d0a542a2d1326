package main

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/internal/logguard"
	"github.com/fleetgate/fleetgate/server"
)

// errEKRefused makes `fleetgate tpm check` exit with status 1 after it
// printed why.
var errEKRefused = errors.New("the enrollment server would refuse this EK certificate")

func tpmCmd() *cobra.Command {
	c := &cobra.Command{Use: "tpm", Short: "TPM endorsement key tools"}
	var ekPath, denyPath, rootsDir string
	check := &cobra.Command{
		Use:   "check --ek-cert FILE [--tpm-deny-list FILE] [--tpm-roots DIR]",
		Short: "Explain what TPM enrollment decides about an EK certificate: TPM attributes, EK profile, chain, ROCA, deny-list",
		Long: `Prints the TPM identification an EK certificate carries (manufacturer, model,
firmware version), whether it is an EK certificate by the TCG profile, whether it
chains to --tpm-roots (if given), whether its RSA modulus is ROCA-vulnerable, and
which rule of the deny-list (if given) matches, with the refusal code the
enrollment server would answer. Exits with status 1 if it would refuse.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return tpmCheck(cmd.OutOrStdout(), ekPath, denyPath, rootsDir, time.Now())
		},
	}
	check.Flags().StringVar(&ekPath, "ek-cert", "", "EK certificate, PEM or DER")
	check.Flags().StringVar(&denyPath, "tpm-deny-list", "", "TPM deny-list file (YAML), as given to serve")
	check.Flags().StringVar(&rootsDir, "tpm-roots", "", "folder of TPM manufacturer root certificates, as given to serve")
	_ = check.MarkFlagRequired("ek-cert")
	c.AddCommand(check)
	return c
}

func tpmCheck(out io.Writer, ekPath, denyPath, rootsDir string, now time.Time) error {
	raw, err := os.ReadFile(ekPath)
	if err != nil {
		return err
	}
	der := raw
	if b, _ := pem.Decode(raw); b != nil {
		if b.Type != "CERTIFICATE" {
			return fmt.Errorf("%s: PEM block %q, want CERTIFICATE", ekPath, b.Type)
		}
		der = b.Bytes
	}
	var deny *attest.DenyList
	if denyPath != "" {
		if deny, err = attest.LoadDenyList(denyPath); err != nil {
			return err
		}
	}
	roots, err := server.LoadPEMDir(rootsDir)
	if err != nil {
		return fmt.Errorf("TPM manufacturer roots: %w", err)
	}
	refused := ""
	verdict := func(step string, err error) {
		if err == nil {
			fmt.Fprintf(out, "%-12s ok\n", step+":")
			return
		}
		code := enroll.EKRefusalCode(err)
		fmt.Fprintf(out, "%-12s REFUSED (%s): %v\n", step+":", code, err)
		if refused == "" {
			refused = code
		}
	}

	fmt.Fprintf(out, "EK certificate %s\n", ekPath)
	if cert, err := x509.ParseCertificate(der); err == nil {
		fmt.Fprintf(out, "  subject:      %s\n  issuer:       %s\n  valid:        %s to %s\n",
			cert.Subject, cert.Issuer, cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339))
		switch k := cert.PublicKey.(type) {
		case *rsa.PublicKey:
			fmt.Fprintf(out, "  key:          RSA %d, e=%d\n", k.N.BitLen(), k.E)
		case *ecdsa.PublicKey:
			fmt.Fprintf(out, "  key:          ECC %s\n", k.Curve.Params().Name)
		default:
			fmt.Fprintf(out, "  key:          %T\n", cert.PublicKey)
		}
		fmt.Fprintf(out, "  fingerprint:  %s\n  auto ID:      %s\n", api.EKFingerprint(cert.RawSubjectPublicKeyInfo), api.AutoDeviceID(cert.RawSubjectPublicKeyInfo))
		if info, err := attest.EKTPMInfo(cert); err == nil {
			fmt.Fprintf(out, "  manufacturer: %s\n  model:        %s\n  version:      %s\n",
				logguard.Clip(info.Manufacturer, 128), logguard.Clip(info.Model, 128), logguard.Clip(info.Version, 128))
		} else {
			fmt.Fprintf(out, "  TPM identification: none (%v)\n", err)
		}
	}

	cert, _, err := attest.ParseEKCertificate(der)
	verdict("EK profile", err)
	if err != nil {
		fmt.Fprintf(out, "verdict:     refused (%s)\n", refused)
		return errEKRefused
	}
	if roots != nil {
		_, err := attest.VerifyEKCertificate(der, roots, now)
		verdict("chain", err)
	} else {
		fmt.Fprintf(out, "%-12s not checked (no --tpm-roots)\n", "chain:")
	}
	rule, err := deny.CheckEK(cert)
	switch {
	case errors.Is(err, attest.ErrEKROCA):
		verdict("ROCA", err)
	case err != nil:
		fmt.Fprintf(out, "%-12s ok\n", "ROCA:")
		if rule != nil {
			fmt.Fprintf(out, "deny-list:   matches rule %q\n", rule.Name)
		}
		verdict("deny-list", err)
	default:
		if _, isRSA := cert.PublicKey.(*rsa.PublicKey); isRSA {
			fmt.Fprintf(out, "%-12s ok (modulus lacks the CVE-2017-15361 fingerprint)\n", "ROCA:")
		} else {
			fmt.Fprintf(out, "%-12s not applicable (ECC)\n", "ROCA:")
		}
		if deny == nil {
			fmt.Fprintf(out, "%-12s none given (--tpm-deny-list)\n", "deny-list:")
		} else {
			fmt.Fprintf(out, "%-12s allowed (no rule of %d matches)\n", "deny-list:", len(deny.Rules))
		}
	}
	if refused != "" {
		fmt.Fprintf(out, "verdict:     refused (%s)\n", refused)
		return errEKRefused
	}
	fmt.Fprintln(out, "verdict:     allowed")
	return nil
}
