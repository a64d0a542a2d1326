package enroll_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/server"
)

// Server CPU per enrollment (docs/performance.md, "Enrollment: server CPU
// per enrollment"). The enrollment server runs in the benchmark process as
// `fleetgate serve` builds it (real TLS listener, real badger registry with
// synced writes, real CA signing, logs formatted at info); the load comes
// from a child process (this test binary re-run as TestEnrollLoadClient),
// so the benchmark process's CPU time is the server's alone, and
// -cpuprofile profiles the server only:
//
//	go test -run '^$' -bench 'EnrollServer' -benchtime 400x -cpuprofile cpu.out ./enroll/
//	go tool pprof -top -cum enroll.test cpu.out
//
// -cpuprofile also covers the setup (minting tokens, pre-generating TPM
// evidence); FLEETGATE_ENROLL_CPUPROFILE=cpu.out profiles the measured
// part alone (then without -cpuprofile).
//
// Each enrollment is one new TLS connection with a full handshake, as a
// device makes it (a TPM enrollment's two round trips share it, as
// devicesdk does). Key generation and CSRs (token), and the TPM side
// (TPM enrollment) are done before the timer starts.
//
// TPM evidence is pre-generated with swtpm: a first server whose
// randomness (Config.Rand: challenge IDs, credential secrets, nonces) is a
// seeded stream issues the challenges, the swtpm devices answer them
// (ActivateCredential, Certify, a CSR signed in the TPM); a second, fresh
// server with the same seed then issues the same IDs, secrets and nonces
// in the same order (the client sends the challenges one at a time), so
// the recorded answers are the correct ones and every check runs in full.

// benchSeed seeds the enrollment server's randomness in the TPM benchmark.
const benchSeed = 17

// lockedRand is a seeded, goroutine-safe io.Reader.
type lockedRand struct {
	mu sync.Mutex
	r  *mrand.ChaCha8
}

func newLockedRand(seed uint64) *lockedRand {
	var s [32]byte
	s[0] = byte(seed)
	return &lockedRand{r: mrand.NewChaCha8(s)}
}

func (l *lockedRand) Read(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.r.Read(b)
}

// perfServer is an enrollment server built as server.buildEnrollment
// builds it.
type perfServer struct {
	reg  *registry.Registry
	addr string
	ca   *ca.Authority
	stop func()
}

func startPerfServer(tb testing.TB, tpmRoots *x509.CertPool, rnd io.Reader) *perfServer {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "data")
	if _, err := server.Init(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		tb.Fatal(err)
	}
	l := server.Layout{Dir: dir}
	auth, err := ca.Load(dir, ca.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	serverCert, err := tls.LoadX509KeyPair(l.ServerCert(), l.ServerKey())
	if err != nil {
		tb.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))
	reg, err := registry.Open(l.RegistryDir(), registry.Options{Logger: log})
	if err != nil {
		tb.Fatal(err)
	}
	es, err := enroll.New(enroll.Config{CA: auth, Registry: reg, Logger: log, Metrics: prometheus.NewRegistry(), TPMRoots: tpmRoots, Rand: rnd})
	if err != nil {
		tb.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{Handler: es.Handler(), TLSConfig: es.TLSConfig(serverCert),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeTLS(ln, "", "")
	}()
	var once sync.Once
	s := &perfServer{reg: reg, addr: ln.Addr().String(), ca: auth}
	s.stop = func() {
		once.Do(func() {
			srv.Close()
			<-done
			reg.Close()
		})
	}
	tb.Cleanup(s.stop)
	return s
}

// loadJob is what the load client (TestEnrollLoadClient) runs.
type loadJob struct {
	Addr     string
	RootsPEM []byte
	Workers  int
	Token    []api.TokenEnrollRequest
	TPM      []tpmEvidence
}

// tpmEvidence is one recorded TPM enrollment: its challenge request, and
// its complete request without the challenge ID.
type tpmEvidence struct {
	Challenge api.TPMChallengeRequest
	Complete  api.TPMCompleteRequest
}

const loadJobEnv = "FLEETGATE_ENROLL_LOAD_JOB"

// profileEnv names a file for a CPU profile of the measured part only
// (-cpuprofile also covers the setup: token minting, TPM evidence).
const profileEnv = "FLEETGATE_ENROLL_CPUPROFILE"

// runLoad runs job in a child process and returns the server's (this
// process's) CPU time over it.
func runLoad(b *testing.B, job *loadJob) time.Duration {
	b.Helper()
	f := filepath.Join(b.TempDir(), "job.json")
	data, err := json.Marshal(job)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(f, data, 0o600); err != nil {
		b.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run", "^TestEnrollLoadClient$", "-test.count", "1")
	cmd.Env = append(os.Environ(), loadJobEnv+"="+f)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if prof := os.Getenv(profileEnv); prof != "" {
		pf, err := os.Create(prof)
		if err != nil {
			b.Fatal(err)
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			b.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	before := selfCPU()
	b.ResetTimer()
	err = cmd.Run()
	b.StopTimer()
	cpu := selfCPU() - before
	if err != nil {
		b.Fatalf("load client: %v\n%s", err, out.String())
	}
	return cpu
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func reportCPU(b *testing.B, cpu time.Duration, n int) {
	b.ReportMetric(float64(cpu.Microseconds())/float64(n), "server-µs/enroll")
	b.ReportMetric(float64(n)/cpu.Seconds(), "enroll/core-s")
}

// BenchmarkEnrollServerToken: token enrollment, b.N devices, 16 at once.
func BenchmarkEnrollServerToken(b *testing.B) {
	s := startPerfServer(b, nil, nil)
	job := &loadJob{Addr: s.addr, RootsPEM: []byte(s.ca.RootPEM()), Workers: 16}
	for i := range b.N {
		id := fmt.Sprintf("tok-%05d", i)
		tok, tid, secret, err := enroll.NewToken(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		now := time.Now()
		if err := s.reg.CreateToken(registry.Token{ID: tid, Hash: registry.HashTokenSecret(secret), DeviceID: id, Group: "bench",
			CreatedBy: "bench", CreatedAt: now, ExpiresAt: now.Add(time.Hour)}, "bench"); err != nil {
			b.Fatal(err)
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
		if err != nil {
			b.Fatal(err)
		}
		job.Token = append(job.Token, api.TokenEnrollRequest{DeviceID: id, Token: tok, CSR: csr})
	}
	reportCPU(b, runLoad(b, job), b.N)
}

// BenchmarkEnrollServerTPM: TPM enrollment, b.N enrollments of 4 swtpm
// devices (each enrolls b.N/4 times), 8 at once, from pre-generated
// evidence.
func BenchmarkEnrollServerTPM(b *testing.B) {
	if testing.Short() {
		b.Skip("starts swtpm")
	}
	if b.N > 2000 {
		b.Fatalf("b.N = %d TPM enrollments to pre-generate; use -benchtime 400x", b.N)
	}
	m := swtpm.ManufacturerForTest(b)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(m.RootPEM())
	const nDev = 4
	rec := startPerfServer(b, roots, newLockedRand(benchSeed))
	recRoots := x509.NewCertPool()
	recRoots.AppendCertsFromPEM([]byte(rec.ca.RootPEM()))
	devs := make([]*tpmDevice, nDev)
	var regs []registry.EKRegistration
	for i := range devs {
		devs[i] = newTPMDevice(b, m, "https://"+rec.addr, recRoots, fmt.Sprintf("tpm-%03d", i))
		regs = append(regs, registry.EKRegistration{Fingerprint: api.EKFingerprint(devs[i].keys.EK().Cert.RawSubjectPublicKeyInfo), DeviceID: devs[i].dev.ID(), Group: "bench"})
	}
	if err := rec.reg.ImportEKs(regs, "bench"); err != nil {
		b.Fatal(err)
	}
	// Record: one enrollment at a time, devices in turn.
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: recRoots}}}
	ev := make([]tpmEvidence, b.N)
	for k := range ev {
		d := devs[k%nDev]
		e := &ev[k]
		e.Challenge = api.TPMChallengeRequest{DeviceID: d.dev.ID(), EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()}
		var ch api.TPMChallengeResponse
		if err := postJSONTo(hc, "https://"+rec.addr+api.PathTPMChallenge, e.Challenge, &ch); err != nil {
			b.Fatal(err)
		}
		secret, err := d.keys.ActivateCredential(ch.CredentialBlob, ch.EncryptedSecret)
		if err != nil {
			b.Fatal(err)
		}
		att, err := d.keys.Attest(ch.Nonce)
		if err != nil {
			b.Fatal(err)
		}
		csr, err := d.dev.CSR()
		if err != nil {
			b.Fatal(err)
		}
		e.Complete = api.TPMCompleteRequest{Secret: secret, TLSPublic: att.TLSPublic, CertifyInfo: att.CertifyInfo,
			CertifySignature: att.CertifySignature, CSR: csr}
		if err := postJSONTo(hc, "https://"+rec.addr+api.PathTPMComplete, func() api.TPMCompleteRequest {
			c := e.Complete
			c.ChallengeID = ch.ChallengeID
			return c
		}(), &api.EnrollResponse{}); err != nil {
			b.Fatalf("recording enrollment %d: %v", k, err)
		}
	}
	hc.CloseIdleConnections()
	rec.stop()

	s := startPerfServer(b, roots, newLockedRand(benchSeed))
	if err := s.reg.ImportEKs(regs, "bench"); err != nil {
		b.Fatal(err)
	}
	job := &loadJob{Addr: s.addr, RootsPEM: []byte(s.ca.RootPEM()), Workers: 8, TPM: ev}
	reportCPU(b, runLoad(b, job), b.N)
}

func postJSONTo(hc *http.Client, url string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	resp, err := hc.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %d %s", url, resp.StatusCode, data)
	}
	return json.Unmarshal(data, out)
}

// TestEnrollLoadClient is the load generator of the EnrollServer
// benchmarks, run by them in a child process; it does nothing otherwise.
func TestEnrollLoadClient(t *testing.T) {
	f := os.Getenv(loadJobEnv)
	if f == "" {
		t.Skip("the EnrollServer benchmarks' load client")
	}
	data, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	var job loadJob
	if err := json.Unmarshal(data, &job); err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(job.RootsPEM)
	tcfg := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	n := len(job.Token) + len(job.TPM)
	var (
		mu   sync.Mutex // the next job; held across a TPM challenge (see above)
		next int
		errs = make(chan error, job.Workers)
		wg   sync.WaitGroup
	)
	for range job.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				conn, err := tls.Dial("tcp", job.Addr, tcfg)
				if err != nil {
					errs <- err
					return
				}
				c := &httpConn{conn: conn, br: bufio.NewReader(conn)}
				mu.Lock()
				k := next
				next++
				if k >= n {
					mu.Unlock()
					conn.Close()
					return
				}
				if len(job.Token) > 0 {
					mu.Unlock()
					err = c.post(api.PathEnrollToken, job.Token[k], &api.EnrollResponse{})
				} else {
					e := job.TPM[k]
					var ch api.TPMChallengeResponse
					err = c.post(api.PathTPMChallenge, e.Challenge, &ch)
					mu.Unlock()
					if err == nil {
						e.Complete.ChallengeID = ch.ChallengeID
						err = c.post(api.PathTPMComplete, e.Complete, &api.EnrollResponse{})
					}
				}
				conn.Close()
				if err != nil {
					errs <- fmt.Errorf("enrollment %d: %w", k, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	if err := errors.Join(all...); err != nil {
		t.Fatal(err)
	}
}

// httpConn is HTTP/1.1 over one TLS connection.
type httpConn struct {
	conn *tls.Conn
	br   *bufio.Reader
}

func (c *httpConn) post(path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, "https://localhost"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := req.Write(c.conn); err != nil {
		return err
	}
	resp, err := http.ReadResponse(c.br, req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %d %s", path, resp.StatusCode, data)
	}
	return json.Unmarshal(data, out)
}
