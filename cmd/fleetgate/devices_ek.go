package main

import (
	"bufio"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
)

const importHelp = `Register many TPM endorsement keys in one transaction: all of them or none.

FILE is CSV, one device per line:

    ek_cert,device_id,group

  ek_cert    path of the EK certificate (PEM or DER), relative to FILE's folder
             unless absolute; paths cannot contain commas
  device_id  1-64 characters of [a-z0-9-], starting with a letter or digit
  group      optional, default "default"

Blank lines and lines starting with # are ignored; a first line
"ek_cert,device_id,group" is taken as a header. If any line is bad, nothing is
registered and every bad line is reported with its line number (the server is
asked to check the good ones too, without registering them). Exit status 1.

Example:

    # line 1 is this comment
    ek_cert,device_id,group
    certs/sensor-0001.pem,sensor-0001,greenhouse
    certs/sensor-0002.pem,sensor-0002,greenhouse`

// addEKCommands adds manufacturing registration (register, import) to the
// devices command.
func addEKCommands(devices *cobra.Command, af *adminFlags) {
	var ekFile, device, group string
	var regJSON, impJSON *bool
	register := &cobra.Command{
		Use:   "register --ek-cert FILE --device ID [--group G]",
		Short: "Register a device's TPM endorsement key (manufacturing)",
		Long: "Register a device's TPM endorsement key certificate (PEM or DER) under a device ID and group.\n" +
			"The device can then enroll by TPM attestation. With manufacturer roots configured, the\n" +
			"certificate must chain to one of them.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := nameOf(identity.RoleDevice, device)
			if err != nil {
				return fmt.Errorf("--device: %w", err)
			}
			device = d
			der, err := readEKCert(ekFile)
			if err != nil {
				return err
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				r, err := cl.RegisterEK(ctx, api.EKRegisterRequest{EKCert: der, DeviceID: device, Group: group})
				if err != nil {
					return err
				}
				if *regJSON {
					return printJSON(cmd.OutOrStdout(), r)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "registered device %s (group %s), EK %s\n", r.DeviceID, r.Group, r.EKFingerprint)
				return nil
			})
		},
	}
	register.Flags().StringVar(&ekFile, "ek-cert", "", "EK certificate file, PEM or DER (required)")
	register.Flags().StringVar(&device, "device", "", "device ID (required)")
	register.Flags().StringVar(&group, "group", "default", "device group")
	_ = register.MarkFlagRequired("ek-cert")
	_ = register.MarkFlagRequired("device")
	regJSON = jsonFlag(register)

	imp := &cobra.Command{
		Use:   "import FILE",
		Short: "Register many TPM endorsement keys from a CSV file, all or nothing",
		Long:  importHelp,
		Args:  exactArgs("FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			entries, problems, err := parseImport(f, filepath.Dir(args[0]))
			f.Close()
			if err != nil {
				return err
			}
			if len(entries) == 0 && len(problems) == 0 {
				return fmt.Errorf("%s: no entries", args[0])
			}
			return af.call(cmd, func(ctx context.Context, cl *client.Client) error {
				if len(entries) > 0 {
					resp, err := cl.ImportEKs(ctx, api.EKImportRequest{Entries: entries, DryRun: len(problems) > 0})
					var ie *client.ImportError
					switch {
					case errors.As(err, &ie):
						problems = append(problems, ie.Problems...)
					case err != nil:
						return err
					case len(problems) == 0 && *impJSON:
						return printJSON(cmd.OutOrStdout(), resp)
					case len(problems) == 0:
						fmt.Fprintf(cmd.OutOrStdout(), "registered %d devices from %s\n", len(resp.Registered), args[0])
						return nil
					}
				}
				sortByLine(problems)
				w := cmd.ErrOrStderr()
				for _, p := range problems {
					fmt.Fprintf(w, "%s:%d: %s: %s\n", args[0], p.Line, p.Code, p.Message)
				}
				return fmt.Errorf("%s: %d bad lines; nothing was registered", args[0], len(problems))
			})
		},
	}
	impJSON = jsonFlag(imp)
	devices.AddCommand(register, imp)
}

// readEKCert reads a PEM or DER certificate file and returns the DER.
func readEKCert(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ekCertDER(b)
}

func ekCertDER(b []byte) ([]byte, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block is %q, want CERTIFICATE", blk.Type)
		}
		return blk.Bytes, nil
	}
	if len(b) == 0 || b[0] != 0x30 {
		return nil, errors.New("neither a PEM certificate nor DER")
	}
	return b, nil
}

// parseImport reads an import file (see importHelp). Certificate paths are
// relative to dir. It returns the good entries (with their line numbers)
// and a problem for every bad line; err only for an unreadable file.
func parseImport(r io.Reader, dir string) ([]api.EKRegisterRequest, []api.ImportProblem, error) {
	var entries []api.EKRegisterRequest
	var problems []api.ImportProblem
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	first := true
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		bad := func(code, format string, a ...any) {
			problems = append(problems, api.ImportProblem{Line: n, Code: code, Message: fmt.Sprintf(format, a...)})
		}
		fields := strings.Split(line, ",")
		for i := range fields {
			fields[i] = strings.TrimSpace(fields[i])
		}
		if first {
			first = false
			if len(fields) >= 2 && fields[0] == "ek_cert" && fields[1] == "device_id" {
				continue
			}
		}
		if len(fields) < 2 || len(fields) > 3 {
			bad("line_format", "want ek_cert,device_id[,group], got %d fields", len(fields))
			continue
		}
		e := api.EKRegisterRequest{DeviceID: fields[1], Line: n}
		if len(fields) == 3 {
			e.Group = fields[2]
		}
		if err := identity.ValidateName(e.DeviceID); err != nil {
			bad("invalid_device_id", "device %q: %v", e.DeviceID, err)
			continue
		}
		if e.Group != "" {
			if err := identity.ValidateName(e.Group); err != nil {
				bad("invalid_group", "group %q: %v", e.Group, err)
				continue
			}
		}
		p := fields[0]
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		der, err := readEKCert(p)
		if err != nil {
			bad("ek_cert_unreadable", "%s: %v", fields[0], err)
			continue
		}
		e.EKCert = der
		entries = append(entries, e)
	}
	if err := sc.Err(); err != nil {
		return nil, nil, err
	}
	return entries, problems, nil
}

func sortByLine(ps []api.ImportProblem) {
	slices.SortStableFunc(ps, func(a, b api.ImportProblem) int { return a.Line - b.Line })
}
