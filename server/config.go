package server

// The configuration of one server process, in one struct with its defaults
// in one place (Defaults). `fleetgate serve` layers it: built-in defaults,
// then an optional YAML file, then FLEETGATE_* environment variables, then
// command-line flags; every problem found is reported at once, each with
// where the value came from (Load). Tests start from Defaults() too
// (internal/testenv). The parts' own configurations (broker.Config,
// enroll.Config) are derived from it, each in one builder (build.go).

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/console"
)

// Config is the configuration of one server process (`fleetgate serve`).
// The fields with a yaml key are settings (flag, env variable, YAML key);
// those without are set by the program (the serve command, tests).
type Config struct {
	DataDir          string        `yaml:"data_dir"`
	MQTTAddr         string        `yaml:"mqtt_addr"`
	APIAddr          string        `yaml:"api_addr"`
	MetricsAddr      string        `yaml:"metrics_addr"`
	Only             string        `yaml:"only"`
	DeviceCertTTL    time.Duration `yaml:"device_cert_ttl"`
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	MaxPending       int           `yaml:"max_pending"`
	MaxPacketSize    uint32        `yaml:"max_packet_size"`
	LogLevel         string        `yaml:"log_level"`
	LogFormat        string        `yaml:"log_format"`
	AddrFile         string        `yaml:"addr_file"`
	TPMRootsDir      string        `yaml:"tpm_roots"`
	TPMPolicy        string        `yaml:"tpm_policy"`
	EnrollURL        string        `yaml:"enroll_url"`
	PolicyFile       string        `yaml:"policy"`
	MsgRate          float64       `yaml:"msg_rate"`
	MsgBurst         int           `yaml:"msg_burst"`
	ByteRate         float64       `yaml:"byte_rate"`
	MaxSubscriptions int           `yaml:"max_subscriptions"`
	MaxPendingPerIP  int           `yaml:"max_pending_per_ip"`
	MaxQoS           int           `yaml:"max_qos"`
	ReceiveMaximum   int           `yaml:"receive_maximum"`
	// MaxQueuedDevice/Service: QoS 1/2 messages an offline persistent
	// session holds (broker.Queues MaxOffline; 0: no quota).
	MaxQueuedDevice  int `yaml:"max_queued_device"`
	MaxQueuedService int `yaml:"max_queued_service"`
	// TPM deny-list: a YAML file of TPMs (manufacturer, model, firmware
	// version) refused at TPM enrollment and EK registration; read at start,
	// a bad file stops the server (enroll/attest.DenyList).
	TPMDenyList string `yaml:"tpm_deny_list"`
	// PKI: the issuing CA key's reference (enroll/ca/keystore: file:,
	// pkcs11:, tpm:; empty: <data-dir>/ca/issuing.key), the plain-HTTP
	// OCSP listener and the OCSP URL put into issued certificates.
	CAKey    string `yaml:"ca_key"`
	OCSPAddr string `yaml:"ocsp_addr"`
	OCSPURL  string `yaml:"ocsp_url"`

	// admission: the broker's admission of connections under floods, and
	// per-client rates of SUBSCRIBE/UNSUBSCRIBE (docs/operations.md).
	HelloTimeout time.Duration `yaml:"hello_timeout"`
	SubRate      float64       `yaml:"sub_rate"`
	SubBurst     int           `yaml:"sub_burst"`
	MaxKeepalive int           `yaml:"max_keepalive"`

	// Cluster: a node of a cluster on NATS JetStream (server/cluster.go);
	// zero is the single box.
	Cluster ClusterConfig `yaml:",inline"`
	// devices in the field: TLS 1.2 and MQTT over WebSocket (broker-field)
	MinTLS    string `yaml:"min_tls"`
	WSSListen string `yaml:"wss_listen"`
	// console: the web console's TLS listener (empty: off) and the URL its
	// sign-in links start with (default https://localhost:<port>).
	ConsoleAddr string `yaml:"console_addr"`
	ConsoleURL  string `yaml:"console_url"`

	// Set by the program, not by flags, env or YAML.

	// Logger receives the process's log (nil: discarded); the serve
	// command builds it from LogLevel and LogFormat.
	Logger *slog.Logger `yaml:"-"`
	// Reload, when it receives, reloads the policy file (SIGHUP). A bad
	// file is refused with every error; the old policy stays.
	Reload <-chan struct{} `yaml:"-"`
	// SweepInterval of the broker's expired-session sweep.
	SweepInterval time.Duration `yaml:"-"`
	// ByteBurst is the per-client payload burst above ByteRate (0: four
	// times ByteRate, as `fleetgate serve` always had it).
	ByteBurst int `yaml:"-"`
	// TopicAliasMaximum per MQTT 5 client (0: the broker's 16; negative:
	// none).
	TopicAliasMaximum int `yaml:"-"`
	// Queues are the broker's outbound queue policies (zero: the broker's
	// DefaultQueues); a zero MaxOffline takes MaxQueuedDevice/Service.
	Queues broker.Queues `yaml:"-"`
	// Console tunes the web console (zero: its defaults).
	Console console.Options `yaml:"-"`
}

// DefaultDataDir is used when nothing else names one.
const DefaultDataDir = "./fleetgate-data"

// EnvPrefix prefixes every environment variable.
const EnvPrefix = "FLEETGATE_"

// Defaults returns the built-in defaults: the one place they are written.
func Defaults() Config {
	return Config{
		DataDir: DefaultDataDir, MQTTAddr: ":8883", APIAddr: ":8443", MetricsAddr: "127.0.0.1:9090",
		DeviceCertTTL: 90 * 24 * time.Hour, HandshakeTimeout: 10 * time.Second, MaxPending: 1024,
		MaxPacketSize: 256 << 10, LogLevel: "info", LogFormat: "text", TPMPolicy: "allowlist", EnrollURL: "https://localhost:8443",
		// Per-client limits and offline quotas: the broker's policies
		// (broker.DefaultLimits, broker.DefaultQueues).
		MsgRate: broker.DefaultLimits.MsgRate, MsgBurst: broker.DefaultLimits.MsgBurst, ByteRate: broker.DefaultLimits.ByteRate,
		MaxSubscriptions: broker.DefaultLimits.MaxSubscriptions, MaxPendingPerIP: 64, MaxQoS: 2, ReceiveMaximum: 256,
		MaxQueuedDevice: broker.DefaultQueues.Device.MaxOffline, MaxQueuedService: broker.DefaultQueues.Service.MaxOffline,
		// admission
		HelloTimeout: 3 * time.Second, SubRate: broker.DefaultLimits.SubRate, SubBurst: broker.DefaultLimits.SubBurst,
		MaxKeepalive:  broker.DefaultMaxKeepalive,
		SweepInterval: 10 * time.Second,
		Cluster:       ClusterConfig{StaleAfter: time.Second, StaleCloseAfter: DefaultStaleCloseAfter},
		MinTLS:        "1.3",
	}
}

// Flags defines the serve flags on fs, with defaults d.
func Flags(fs *pflag.FlagSet, d Config) {
	fs.String("config", "", "YAML configuration file")
	fs.String("data-dir", d.DataDir, "data directory (CA, registry, broker state)")
	fs.String("mqtt-addr", d.MQTTAddr, "MQTT mTLS listen address")
	fs.String("api-addr", d.APIAddr, "enrollment HTTPS API listen address")
	fs.String("metrics-addr", d.MetricsAddr, "/healthz, /readyz and /metrics listen address (empty: off)")
	fs.String("only", d.Only, "run only one part: broker or enroll")
	fs.Duration("device-cert-ttl", d.DeviceCertTTL, "device certificate lifetime")
	fs.Duration("handshake-timeout", d.HandshakeTimeout, "deadline for TLS handshake plus MQTT CONNECT")
	fs.Int("max-pending", d.MaxPending, "connections allowed in TLS handshake or before CONNECT")
	fs.Uint32("max-packet-size", d.MaxPacketSize, "largest MQTT packet in bytes")
	fs.String("log-level", d.LogLevel, "debug, info, warn or error")
	fs.String("log-format", d.LogFormat, "text or json")
	fs.String("addr-file", d.AddrFile, "write bound addresses as JSON to this file once serving")
	fs.String("tpm-roots", d.TPMRootsDir, "folder of PEM files: trusted TPM manufacturer roots for EK certificates")
	fs.Float64("msg-rate", d.MsgRate, "per-device PUBLISH rate (messages/s); over it (plus --msg-burst): disconnect, MQTT 5 reason 0x96")
	fs.Int("msg-burst", d.MsgBurst, "per-device PUBLISH burst above --msg-rate")
	fs.Float64("byte-rate", d.ByteRate, "per-device payload rate (bytes/s); over it: disconnect, MQTT 5 reason 0x97")
	fs.Int("max-subscriptions", d.MaxSubscriptions, "subscriptions per client")
	fs.Int("max-pending-per-ip", d.MaxPendingPerIP, "stalled connections (no complete TLS ClientHello yet) per source address; beyond it the address's oldest stalled one is closed")
	fs.Int("max-qos", d.MaxQoS, "highest QoS granted (0, 1 or 2)")
	fs.Int("receive-maximum", d.ReceiveMaximum, "in-flight QoS 1/2 window per client")
	fs.Int("max-queued-device", d.MaxQueuedDevice, "QoS 1/2 messages an offline persistent device session holds; past it: not queued for it, counted (0: no quota)")
	fs.Int("max-queued-service", d.MaxQueuedService, "the same for service and operator sessions")
	fs.String("policy", d.PolicyFile, "topic policy file (YAML); default <data-dir>/policy.yaml if present, else built-in")
	fs.String("enroll-url", d.EnrollURL, "with --only broker: the enrollment service whose registry feed the broker follows")
	fs.String("tpm-policy", d.TPMPolicy, "allowlist (only EKs registered at manufacturing) or manufacturer (any EK chaining to --tpm-roots)")
	// TPM deny-list
	fs.String("tpm-deny-list", d.TPMDenyList, "YAML file of TPM manufacturers, models and firmware versions refused at enrollment (read at start)")
	// PKI
	fs.String("ca-key", d.CAKey, "issuing CA key: file:PATH, pkcs11:RFC-7512-URI or tpm:handle=0x81...;device=PATH (default <data-dir>/ca/issuing.key)")
	fs.String("ocsp-addr", d.OCSPAddr, "plain-HTTP OCSP responder listen address (empty: only /ocsp on the API listener)")
	fs.String("ocsp-url", d.OCSPURL, "OCSP URL written into issued certificates (default http://<server name>:<ocsp-addr port>/ocsp when --ocsp-addr is set)")
	// admission
	fs.Duration("hello-timeout", d.HelloTimeout, "deadline for a connection's first complete TLS ClientHello (then --handshake-timeout applies)")
	fs.Float64("sub-rate", d.SubRate, "per-device rate of topic filters in SUBSCRIBE/UNSUBSCRIBE (filters/s); over it (plus --sub-burst): disconnect, MQTT 5 reason 0x96")
	fs.Int("sub-burst", d.SubBurst, "per-device burst of topic filters above --sub-rate")
	fs.Int("max-keepalive", d.MaxKeepalive, "longest MQTT keepalive granted, in seconds (1-65535); a client asking for 0 or more gets this (MQTT 5: told in the CONNACK)")
	clusterFlags(fs, d)
	// devices in the field
	fs.String("min-tls", d.MinTLS, "lowest TLS version of MQTT and wss clients: 1.3, or 1.2 (ECDHE-ECDSA with AES-GCM or ChaCha20-Poly1305 only)")
	fs.String("wss-listen", d.WSSListen, "MQTT over WebSocket (wss, mTLS) listen address (empty: off)")
	// console
	fs.String("console-addr", d.ConsoleAddr, "web console HTTPS listen address (empty: off); sign in with `fleetgate console login`")
	fs.String("console-url", d.ConsoleURL, "URL the console's sign-in links start with (default https://localhost:<console port>)")
}

// keys are the layered settings, by flag name.
var keys = []string{"data-dir", "mqtt-addr", "api-addr", "metrics-addr", "only", "device-cert-ttl",
	"handshake-timeout", "max-pending", "max-packet-size", "log-level", "log-format", "addr-file", "tpm-roots", "tpm-policy", "enroll-url", "policy",
	"msg-rate", "msg-burst", "byte-rate", "max-subscriptions", "max-pending-per-ip", "max-qos", "receive-maximum",
	"max-queued-device", "max-queued-service",
	"tpm-deny-list", // TPM deny-list
	// PKI
	"ca-key", "ocsp-addr", "ocsp-url",
	// admission
	"hello-timeout", "sub-rate", "sub-burst", "max-keepalive",
	"console-addr", "console-url", // console
	"min-tls", "wss-listen"} // devices in the field

// Load layers YAML file (if --config or FLEETGATE_CONFIG names one),
// environment and flags over the defaults, and validates the result.
func Load(fs *pflag.FlagSet, getenv func(string) string) (Config, error) {
	cfg := Defaults()
	var errs []error
	path, _ := fs.GetString("config")
	if !fs.Changed("config") && getenv(EnvPrefix+"CONFIG") != "" {
		path = getenv(EnvPrefix + "CONFIG")
	}
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return cfg, fmt.Errorf("config file: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		dec.KnownFields(true)
		if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
			errs = append(errs, fmt.Errorf("%s: %w", path, err))
		}
		// One document: settings in a second one ("---") would be
		// dropped without a word.
		var extra yaml.Node
		if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", path, err))
			} else {
				errs = append(errs, fmt.Errorf("%s:%d: a second YAML document; a config file holds exactly one", path, extra.Line))
			}
		}
	}
	// Environment and flags both go through the flag's own parser, so the
	// syntax is the same everywhere.
	for _, k := range keys {
		f := fs.Lookup(k)
		if f == nil {
			continue
		}
		src := ""
		val := ""
		switch {
		case f.Changed:
			src, val = "flag --"+k, f.Value.String()
		case getenv(envName(k)) != "":
			src, val = "env "+envName(k), getenv(envName(k))
			if err := f.Value.Set(val); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", src, val, err))
				continue
			}
		default:
			continue
		}
		if err := assign(&cfg, k, f); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", src, err))
		}
	}
	errs = append(errs, cfg.Validate()...)
	return cfg, errors.Join(errs...)
}

func envName(flag string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func assign(c *Config, k string, f *pflag.Flag) error {
	fs := pflag.NewFlagSet("", pflag.ContinueOnError)
	fs.AddFlag(f)
	var err error
	switch k {
	case "data-dir":
		c.DataDir, err = fs.GetString(k)
	case "mqtt-addr":
		c.MQTTAddr, err = fs.GetString(k)
	case "api-addr":
		c.APIAddr, err = fs.GetString(k)
	case "metrics-addr":
		c.MetricsAddr, err = fs.GetString(k)
	case "only":
		c.Only, err = fs.GetString(k)
	case "device-cert-ttl":
		c.DeviceCertTTL, err = fs.GetDuration(k)
	case "handshake-timeout":
		c.HandshakeTimeout, err = fs.GetDuration(k)
	case "max-pending":
		c.MaxPending, err = fs.GetInt(k)
	case "max-packet-size":
		c.MaxPacketSize, err = fs.GetUint32(k)
	case "log-level":
		c.LogLevel, err = fs.GetString(k)
	case "log-format":
		c.LogFormat, err = fs.GetString(k)
	case "addr-file":
		c.AddrFile, err = fs.GetString(k)
	case "tpm-roots":
		c.TPMRootsDir, err = fs.GetString(k)
	case "tpm-policy":
		c.TPMPolicy, err = fs.GetString(k)
	case "enroll-url":
		c.EnrollURL, err = fs.GetString(k)
	case "policy":
		c.PolicyFile, err = fs.GetString(k)
	case "ca-key":
		c.CAKey, err = fs.GetString(k)
	case "ocsp-addr":
		c.OCSPAddr, err = fs.GetString(k)
	case "ocsp-url":
		c.OCSPURL, err = fs.GetString(k)
	case "msg-rate":
		c.MsgRate, err = fs.GetFloat64(k)
	case "msg-burst":
		c.MsgBurst, err = fs.GetInt(k)
	case "byte-rate":
		c.ByteRate, err = fs.GetFloat64(k)
	case "max-subscriptions":
		c.MaxSubscriptions, err = fs.GetInt(k)
	case "max-pending-per-ip":
		c.MaxPendingPerIP, err = fs.GetInt(k)
	case "max-qos":
		c.MaxQoS, err = fs.GetInt(k)
	case "receive-maximum":
		c.ReceiveMaximum, err = fs.GetInt(k)
	case "max-queued-device":
		c.MaxQueuedDevice, err = fs.GetInt(k)
	case "max-queued-service":
		c.MaxQueuedService, err = fs.GetInt(k)
	case "tpm-deny-list": // TPM deny-list
		c.TPMDenyList, err = fs.GetString(k)
	// admission
	case "hello-timeout":
		c.HelloTimeout, err = fs.GetDuration(k)
	case "sub-rate":
		c.SubRate, err = fs.GetFloat64(k)
	case "sub-burst":
		c.SubBurst, err = fs.GetInt(k)
	case "max-keepalive":
		c.MaxKeepalive, err = fs.GetInt(k)
	case "min-tls": // devices in the field
		c.MinTLS, err = fs.GetString(k)
	case "wss-listen":
		c.WSSListen, err = fs.GetString(k)
	// console
	case "console-addr":
		c.ConsoleAddr, err = fs.GetString(k)
	case "console-url":
		c.ConsoleURL, err = fs.GetString(k)
	default:
		err = assignCluster(c, k, fs)
	}
	return err
}

// Validate returns every problem of c.
func (c Config) Validate() []error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir: must not be empty"))
	}
	checkAddr := func(name, v string, optional bool) {
		if v == "" && optional {
			return
		}
		if _, _, err := net.SplitHostPort(v); err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not host:port: %w", name, v, err))
		}
	}
	checkAddr("mqtt_addr", c.MQTTAddr, false)
	checkAddr("api_addr", c.APIAddr, false)
	checkAddr("metrics_addr", c.MetricsAddr, true)
	checkAddr("console_addr", c.ConsoleAddr, true)
	if c.ConsoleAddr != "" && c.Only == "broker" {
		errs = append(errs, errors.New("console_addr: the console runs where the registry is, not with --only broker"))
	}
	switch c.Only {
	case "", "broker", "enroll":
	default:
		errs = append(errs, fmt.Errorf("only: %q (want broker, enroll or empty)", c.Only))
	}
	if c.DeviceCertTTL < 10*time.Second {
		errs = append(errs, fmt.Errorf("device_cert_ttl: %s is shorter than 10s", c.DeviceCertTTL))
	}
	if c.HandshakeTimeout <= 0 {
		errs = append(errs, errors.New("handshake_timeout: must be positive"))
	}
	if c.MaxPending <= 0 {
		errs = append(errs, errors.New("max_pending: must be positive"))
	}
	if c.MaxPacketSize < 128 {
		errs = append(errs, fmt.Errorf("max_packet_size: %d is below 128 bytes", c.MaxPacketSize))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log_level: %q (want debug, info, warn or error)", c.LogLevel))
	}
	if c.MsgRate <= 0 || c.MsgBurst <= 0 || c.ByteRate <= 0 {
		errs = append(errs, errors.New("msg_rate, msg_burst and byte_rate must be positive"))
	}
	if c.MaxSubscriptions <= 0 || c.MaxPendingPerIP <= 0 {
		errs = append(errs, errors.New("max_subscriptions and max_pending_per_ip must be positive"))
	}
	if c.MaxQoS < 0 || c.MaxQoS > 2 {
		errs = append(errs, fmt.Errorf("max_qos: %d (want 0, 1 or 2)", c.MaxQoS))
	}
	if c.ReceiveMaximum < 1 || c.ReceiveMaximum > 65535 {
		errs = append(errs, fmt.Errorf("receive_maximum: %d (want 1-65535)", c.ReceiveMaximum))
	}
	if c.MaxQueuedDevice < 0 || c.MaxQueuedDevice > 65535 || c.MaxQueuedService < 0 || c.MaxQueuedService > 65535 {
		errs = append(errs, fmt.Errorf("max_queued_device, max_queued_service: %d, %d (want 0-65535)", c.MaxQueuedDevice, c.MaxQueuedService))
	}
	switch c.TPMPolicy {
	case "allowlist", "manufacturer":
	default:
		errs = append(errs, fmt.Errorf("tpm_policy: %q (want allowlist or manufacturer)", c.TPMPolicy))
	}
	if c.TPMPolicy == "manufacturer" && c.TPMRootsDir == "" {
		errs = append(errs, errors.New("tpm_policy manufacturer needs tpm_roots (the manufacturer CA folder)"))
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		errs = append(errs, fmt.Errorf("log_format: %q (want text or json)", c.LogFormat))
	}
	// admission
	if c.HelloTimeout <= 0 || c.HelloTimeout > c.HandshakeTimeout {
		errs = append(errs, fmt.Errorf("hello_timeout: %s (want positive, at most handshake_timeout)", c.HelloTimeout))
	}
	if c.SubRate <= 0 || c.SubBurst <= 0 {
		errs = append(errs, errors.New("sub_rate and sub_burst must be positive"))
	}
	if c.MaxKeepalive < 1 || c.MaxKeepalive > 65535 {
		errs = append(errs, fmt.Errorf("max_keepalive: %d (want 1 to 65535 seconds)", c.MaxKeepalive))
	}
	errs = append(errs, c.Cluster.validate()...)
	// devices in the field
	if _, err := broker.ParseMinTLS(c.MinTLS); err != nil {
		errs = append(errs, fmt.Errorf("min_tls: %q (want 1.2 or 1.3)", c.MinTLS))
	}
	checkAddr("wss_listen", c.WSSListen, true)
	return errs
}
