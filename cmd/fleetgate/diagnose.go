package main

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/operator/diagnose"
	"github.com/fleetgate/fleetgate/server"
)

// errRefused makes `diagnose` exit 1 when the broker would refuse.
var errRefused = errors.New("the broker refuses it")

func diagnoseCmd() *cobra.Command {
	c, af := operatorCmd("diagnose", "Say in plain words why the broker would refuse a device certificate")
	var certFile, keyFile, device, clientID, mqttAddr, serverName, caFile string
	var connect, jsonOut bool
	c.Long = `Runs the broker's own checks on the server (the chain against its client CAs,
then the registry: identity, serial, revocation, device state, then the client
ID), checks the private key locally (it is never sent), and prints the openssl
and mosquitto commands that reproduce the handshake. With --connect it also
makes a live attempt on the broker. Exits 1 when the broker refuses.`
	c.Example = `  fleetgate diagnose --cert device.crt --key device.key
  fleetgate diagnose --device sensor-1
  fleetgate diagnose --cert device.crt --key device.key --connect --mqtt gw.example.com:8883`
	c.RunE = func(cmd *cobra.Command, _ []string) error {
		if certFile == "" && device == "" {
			return errors.New("give --cert FILE (and --key FILE), or --device ID")
		}
		if connect && (certFile == "" || keyFile == "") {
			return errors.New("--connect needs --cert and --key")
		}
		req := api.DiagnoseRequest{DeviceID: device, ClientID: clientID}
		var leaf *x509.Certificate
		var key crypto.Signer
		var pair tls.Certificate
		if certFile != "" {
			b, err := os.ReadFile(certFile)
			if err != nil {
				return err
			}
			req.ChainPEM = string(b)
			certs, err := ca.ReadCertsFile(certFile)
			if err != nil || len(certs) == 0 {
				return fmt.Errorf("%s: no PEM certificate: %v", certFile, err)
			}
			leaf = certs[0]
			if keyFile != "" {
				if key, err = ca.ReadKeyFile(keyFile); err != nil {
					return fmt.Errorf("--key: %w", err)
				}
				pair = tls.Certificate{PrivateKey: key, Leaf: leaf}
				for _, c := range certs {
					pair.Certificate = append(pair.Certificate, c.Raw)
				}
			}
		}
		var rep *api.DiagnoseReport
		err := af.call(cmd, func(ctx context.Context, cl *client.Client) error {
			var err error
			rep, err = cl.Diagnose(ctx, req)
			return err
		})
		if err != nil {
			return err
		}
		if key != nil {
			kc := diagnose.KeyChecks(leaf, key)
			rep.Checks = append(rep.Checks, kc)
			if !kc.OK && rep.Accepted {
				rep.Accepted, rep.Reason, rep.Problem, rep.Summary = false, "handshake_failed", diagnose.ProblemKeyMismatch, kc.Detail
			}
		}
		name := clientID
		if name == "" {
			name = identityName(rep.Identity, leaf, device)
		}
		if mqttAddr == "" {
			mqttAddr = defaultMQTT(af.server)
		}
		if caFile == "" {
			caFile = server.Layout{Dir: af.dataDir}.RootCert()
		}
		var attempt *diagnose.Attempt
		if connect {
			roots, err := ca.ReadCertsFile(caFile)
			if err != nil {
				return fmt.Errorf("--ca-file: %w", err)
			}
			a := diagnose.Connect(cmd.Context(), mqttAddr, serverName, ca.NewPool(roots...), pair, name)
			attempt = &a
		}
		out := cmd.OutOrStdout()
		if jsonOut {
			if err := json.NewEncoder(out).Encode(struct {
				*api.DiagnoseReport
				Live *diagnose.Attempt `json:"live,omitempty"`
			}{rep, attempt}); err != nil {
				return err
			}
		} else {
			printDiagnosis(out, rep, attempt, certFile)
			printReproduce(out, mqttAddr, serverName, caFile, certFile, keyFile, name)
		}
		if !rep.Accepted || (attempt != nil && !attempt.Accepted) {
			return errRefused
		}
		return nil
	}
	f := c.Flags()
	f.StringVar(&certFile, "cert", "", "the device's certificate (PEM; CA certificates after it are sent as its chain)")
	f.StringVar(&keyFile, "key", "", "the device's private key (checked locally, never sent)")
	f.StringVar(&device, "device", "", "the device ID: with --cert, the device it should be; alone, check its current certificate from the registry")
	f.StringVar(&clientID, "client-id", "", "the MQTT client ID the device uses (default: the certificate's identity)")
	f.BoolVar(&connect, "connect", false, "also make a live connection attempt on the broker (needs --cert and --key)")
	f.StringVar(&mqttAddr, "mqtt", "", "broker address host:port (default: --server's host, port 8883)")
	f.StringVar(&serverName, "server-name", "localhost", "name the broker's certificate is checked for")
	f.StringVar(&caFile, "ca-file", "", "the CA the device trusts for the broker (default: the data directory's root CA)")
	f.BoolVar(&jsonOut, "json", false, "print the report as JSON")
	return c
}

// identityName is the client ID a device with this certificate must use.
func identityName(uri string, leaf *x509.Certificate, device string) string {
	if uri != "" {
		if u, err := url.Parse(uri); err == nil {
			if id, err := identity.ParseURI(u, u.Host); err == nil {
				return id.Name
			}
		}
	}
	if leaf != nil {
		for _, u := range leaf.URIs {
			if id, err := identity.ParseURI(u, u.Host); err == nil {
				return id.Name
			}
		}
	}
	if device != "" {
		return device
	}
	return "DEVICE-ID"
}

func defaultMQTT(apiURL string) string {
	host := "localhost"
	if u, err := url.Parse(apiURL); err == nil && u.Hostname() != "" {
		host = u.Hostname()
	}
	return net.JoinHostPort(host, "8883")
}

func printDiagnosis(w io.Writer, rep *api.DiagnoseReport, live *diagnose.Attempt, certFile string) {
	what := certFile
	if what == "" {
		what = "the registry's current certificate"
	}
	fmt.Fprintf(w, "certificate: %s\n", what)
	if rep.Subject != "" {
		fmt.Fprintf(w, "  subject %q, issuer %q, serial %s, %s\n", rep.Subject, rep.Issuer, rep.Serial, rep.KeyAlg)
	}
	if rep.Identity != "" {
		fmt.Fprintf(w, "  identity %s\n", rep.Identity)
	}
	if rep.Accepted {
		fmt.Fprintf(w, "verdict: ACCEPTED\n  %s\n", rep.Summary)
	} else {
		fmt.Fprintf(w, "verdict: REFUSED (the broker logs and counts reason %q; problem %s)\n  %s\n", rep.Reason, rep.Problem, rep.Summary)
	}
	if len(rep.Checks) > 0 {
		fmt.Fprintln(w, "checks, in the broker's order:")
		for _, c := range rep.Checks {
			mark := "ok  "
			if !c.OK {
				mark = "FAIL"
			}
			fmt.Fprintf(w, "  %s %-16s %s\n", mark, c.Name, c.Detail)
		}
	}
	if live != nil {
		verdict := "refused"
		if live.Accepted {
			verdict = "accepted"
		}
		fmt.Fprintf(w, "live attempt: %s at the %s stage: %s\n", verdict, live.Stage, live.Detail)
	}
}

// printReproduce prints the openssl and mosquitto commands that make the
// same handshake.
func printReproduce(w io.Writer, addr, serverName, caFile, certFile, keyFile, clientID string) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		host, port = addr, "8883"
	}
	if certFile == "" {
		certFile = "device.crt"
	}
	if keyFile == "" {
		keyFile = "device.key"
	}
	q := shellQuote
	fmt.Fprintln(w, "reproduce the handshake:")
	fmt.Fprintf(w, "  openssl s_client -connect %s -servername %s -CAfile %s -cert %s -cert_chain %s -key %s -verify_return_error -brief </dev/null\n",
		q(net.JoinHostPort(host, port)), q(serverName), q(caFile), q(certFile), q(certFile), q(keyFile))
	fmt.Fprintf(w, "  mosquitto_pub -h %s -p %s --cafile %s --cert %s --key %s -i %s -t %s -m diagnose -q 1 -d\n",
		q(host), port, q(caFile), q(certFile), q(keyFile), q(clientID), q("devices/"+clientID+"/telemetry/diagnose"))
	if serverName != host {
		fmt.Fprintf(w, "  (mosquitto_pub checks the broker's certificate for %s; if it does not name that host, add --insecure to test only the client side)\n", host)
	}
}

func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
