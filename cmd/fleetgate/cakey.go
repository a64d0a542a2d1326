package main

import (
	"fmt"
	"io"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/server"
)

// initWithCAKey is server.Init with the issuing CA's key created in the
// key store ref names (pkcs11:, tpm:, file:); "" keeps the default
// <data-dir>/ca/issuing.key.
func initWithCAKey(dataDir, ref string, o ca.InitOptions, out io.Writer) (*ca.InitResult, error) {
	if ref == "" {
		return server.Init(dataDir, o)
	}
	k, err := keystore.Generate(ref)
	if err != nil {
		return nil, fmt.Errorf("create the issuing CA key: %w", err)
	}
	defer k.Close()
	o.Key = k
	res, err := server.Init(dataDir, o)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(out, "  issuing CA key:       created in the %s store: %s\n", k.Store(), k.Ref())
	fmt.Fprintf(out, "  start the server with --ca-key (or ca_key:) naming this key\n")
	return res, nil
}
