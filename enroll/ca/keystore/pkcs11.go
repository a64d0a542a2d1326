package keystore

import (
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
)

// pkcs11URI is the part of an RFC 7512 URI the store uses.
type pkcs11URI struct {
	module, token, serial string
	slot                  *int
	object                string
	id                    []byte
	pin                   string
	// redacted is the URI with pin-value replaced.
	redacted string
}

// parsePKCS11URI parses "pkcs11:token=T;object=O;id=%01?module-path=M&pin-value=P"
// (RFC 7512: path attributes split by ';', query attributes by '&', values
// percent-encoded). pin-source=file:PATH reads the PIN from a file.
func parsePKCS11URI(ref string) (*pkcs11URI, error) {
	if !strings.HasPrefix(strings.ToLower(ref), "pkcs11:") {
		return nil, fmt.Errorf("%w: not a pkcs11: URI", ErrBadRef)
	}
	rest := ref[len("pkcs11:"):]
	path, query, _ := strings.Cut(rest, "?")
	u := &pkcs11URI{}
	var red []string
	parse := func(part, sep string, query bool) error {
		if part == "" {
			return nil
		}
		for _, kv := range strings.Split(part, sep) {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("%w: pkcs11 URI attribute %q has no '='", ErrBadRef, k)
			}
			val, err := url.PathUnescape(v)
			if err != nil {
				return fmt.Errorf("%w: pkcs11 URI attribute %s: bad percent-encoding", ErrBadRef, k)
			}
			shown := kv
			switch k {
			case "token":
				u.token = val
			case "serial":
				u.serial = val
			case "slot-id":
				n, err := strconv.Atoi(val)
				if err != nil {
					return fmt.Errorf("%w: pkcs11 URI slot-id %q is not a number", ErrBadRef, val)
				}
				u.slot = &n
			case "object":
				u.object = val
			case "id":
				u.id = []byte(val)
			case "type":
				if val != "private" {
					return fmt.Errorf("%w: pkcs11 URI type=%s (a CA key is type=private)", ErrBadRef, val)
				}
			case "module-path":
				u.module = val
			case "pin-value":
				u.pin = val
				shown = "pin-value=REDACTED"
			case "pin-source":
				p := strings.TrimPrefix(val, "file:")
				b, err := os.ReadFile(p)
				if err != nil {
					return fmt.Errorf("%w: pkcs11 URI pin-source %s: %v", ErrStore, p, err)
				}
				u.pin = strings.TrimRight(string(b), "\r\n")
			default:
				// Other RFC 7512 attributes (manufacturer, model,
				// library-*) do not narrow the selection here.
			}
			if query {
				shown = "?" + shown
			}
			red = append(red, shown)
		}
		return nil
	}
	if err := parse(path, ";", false); err != nil {
		return nil, err
	}
	if err := parse(query, "&", true); err != nil {
		return nil, err
	}
	var b strings.Builder
	b.WriteString("pkcs11:")
	first := true
	for _, r := range red {
		if strings.HasPrefix(r, "?") {
			if first {
				b.WriteString(r)
			} else {
				b.WriteString("&" + r[1:])
			}
			first = false
			continue
		}
		if b.Len() > len("pkcs11:") {
			b.WriteString(";")
		}
		b.WriteString(r)
	}
	u.redacted = b.String()
	if u.module == "" {
		return nil, fmt.Errorf("%w: %s: module-path is missing (e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so)", ErrBadRef, u.redacted)
	}
	if u.token == "" && u.serial == "" && u.slot == nil {
		return nil, fmt.Errorf("%w: %s: name the token (token=, serial= or slot-id=)", ErrBadRef, u.redacted)
	}
	if u.object == "" && len(u.id) == 0 {
		return nil, fmt.Errorf("%w: %s: name the key (object= or id=)", ErrBadRef, u.redacted)
	}
	return u, nil
}

// pkcs11Key is a key on a token.
type pkcs11Key struct {
	crypto11.Signer
	ctx  *crypto11.Context
	ref  string
	once sync.Once
}

func (k *pkcs11Key) Ref() string   { return k.ref }
func (k *pkcs11Key) Store() string { return "pkcs11" }

// Close closes the token context once (crypto11 panics on a second).
func (k *pkcs11Key) Close() error {
	var err error
	k.once.Do(func() { err = k.ctx.Close() })
	return err
}

// Context returns the token context of a PKCS#11 key (nil for other
// stores), for asking the token about the key (tests, diagnostics).
func Context(k Key) *crypto11.Context {
	if p, ok := k.(*pkcs11Key); ok {
		return p.ctx
	}
	return nil
}

// Underlying returns the store's own key object (crypto11.Signer for
// PKCS#11), e.g. for crypto11.Context.GetAttribute.
func Underlying(k Key) any {
	if p, ok := k.(*pkcs11Key); ok {
		return p.Signer
	}
	return nil
}

func configurePKCS11(u *pkcs11URI) (*crypto11.Context, error) {
	if _, err := os.Stat(u.module); err != nil {
		return nil, storeErr("pkcs11", u.redacted, ErrStore, "PKCS#11 module %s: %v", u.module, errors.Unwrap(err))
	}
	cfg := &crypto11.Config{Path: u.module, TokenLabel: u.token, TokenSerial: u.serial, SlotNumber: u.slot, Pin: u.pin}
	if u.token != "" {
		cfg.TokenSerial, cfg.SlotNumber = "", nil
	} else if u.serial != "" {
		cfg.SlotNumber = nil
	}
	ctx, err := crypto11.Configure(cfg)
	if err != nil {
		err = scrub(err, u.pin)
		msg := err.Error()
		var p11 pkcs11.Error
		switch {
		case errors.As(err, &p11) && (p11 == pkcs11.CKR_PIN_INCORRECT || p11 == pkcs11.CKR_PIN_INVALID || p11 == pkcs11.CKR_PIN_LEN_RANGE):
			msg = "wrong PIN (" + msg + ")"
		case strings.Contains(msg, "PIN_INCORRECT"):
			msg = "wrong PIN (" + msg + ")"
		case errors.As(err, &p11) && p11 == pkcs11.CKR_PIN_LOCKED:
			msg = "PIN locked (" + msg + ")"
		case strings.Contains(msg, "could not find"):
			msg = "no such token (" + msg + ")"
		}
		return nil, storeErr("pkcs11", u.redacted, ErrStore, "%s", msg)
	}
	return ctx, nil
}

func openPKCS11(ref string) (Key, error) {
	u, err := parsePKCS11URI(ref)
	if err != nil {
		return nil, err
	}
	ctx, err := configurePKCS11(u)
	if err != nil {
		return nil, err
	}
	found, err := ctx.FindKeyPairs(u.id, labelOf(u))
	if err != nil {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrStore, "find key: %v", scrub(err, u.pin))
	}
	if len(found) == 0 {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrNoKey, "no private key with this object/id (and its public key) on the token")
	}
	if len(found) > 1 {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrBadRef, "%d keys match; name one (object= and id=)", len(found))
	}
	s := found[0]
	if err := checkNonExtractable(ctx, s); err != nil {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrInsecure, "%v", err)
	}
	return &pkcs11Key{Signer: s, ctx: ctx, ref: u.redacted}, nil
}

func generatePKCS11(ref string) (Key, error) {
	u, err := parsePKCS11URI(ref)
	if err != nil {
		return nil, err
	}
	ctx, err := configurePKCS11(u)
	if err != nil {
		return nil, err
	}
	if found, err := ctx.FindKeyPairs(u.id, labelOf(u)); err != nil || len(found) > 0 {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrKeyExists, "a key with this object/id is on the token; it is never replaced")
	}
	id := u.id
	if len(id) == 0 {
		id = make([]byte, 8)
		if _, err := rand.Read(id); err != nil {
			ctx.Close()
			return nil, err
		}
	}
	// crypto11 generates the private half CKA_TOKEN, CKA_PRIVATE,
	// CKA_SENSITIVE and not CKA_EXTRACTABLE; checked below on the token.
	s, err := ctx.GenerateECDSAKeyPairWithLabel(id, labelOf(u), elliptic.P256())
	if err != nil {
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrStore, "generate: %v", scrub(err, u.pin))
	}
	if err := checkNonExtractable(ctx, s); err != nil {
		_ = s.Delete()
		ctx.Close()
		return nil, storeErr("pkcs11", u.redacted, ErrInsecure, "%v", err)
	}
	return &pkcs11Key{Signer: s, ctx: ctx, ref: u.redacted}, nil
}

func labelOf(u *pkcs11URI) []byte {
	if u.object == "" {
		return nil
	}
	return []byte(u.object)
}

// checkNonExtractable asks the token: the private key must be sensitive
// and not extractable.
func checkNonExtractable(ctx *crypto11.Context, s crypto11.Signer) error {
	attrs, err := ctx.GetAttributes(s, []crypto11.AttributeType{crypto11.CkaExtractable, crypto11.CkaSensitive})
	if err != nil {
		return fmt.Errorf("ask the token for CKA_EXTRACTABLE/CKA_SENSITIVE: %v", err)
	}
	if a := attrs[crypto11.CkaExtractable]; a == nil || boolAttr(a.Value) {
		return errors.New("the private key is extractable (CKA_EXTRACTABLE); a CA key must not leave the token")
	}
	if a := attrs[crypto11.CkaSensitive]; a == nil || !boolAttr(a.Value) {
		return errors.New("the private key is not sensitive (CKA_SENSITIVE)")
	}
	return nil
}

func boolAttr(v []byte) bool { return len(v) > 0 && v[0] != 0 }
