package testenv

import (
	"io"
	"net/http"
	"time"
)

// HTTPGet returns the body at url (a metrics or monitoring page), waiting
// 10 s at most and reading 1 MiB at most.
func HTTPGet(url string) (string, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return string(b), err
}
