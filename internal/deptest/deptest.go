// Package deptest checks the dependency rules of fleetgate's layout, as
// tailscale's tstest/deptest does: it runs `go list -deps -json` on package
// patterns and reports every package that depends, directly or not, on a
// package it must not. The rules themselves are in deps_test.go.
package deptest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"strings"
)

// Module is fleetgate's module path.
const Module = "github.com/fleetgate/fleetgate"

// Graph maps an import path to the import paths it imports.
type Graph map[string][]string

// List runs go list -deps -json in dir on patterns and returns the import
// graph of the packages and their dependencies, and the packages the
// patterns name (the roots).
func List(dir string, patterns ...string) (Graph, []string, error) {
	g := Graph{}
	var roots []string
	cmd := exec.Command("go", append([]string{"list", "-deps", "-json=ImportPath,Imports,DepOnly"}, patterns...)...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, nil, fmt.Errorf("go list %v: %v\n%s", patterns, err, stderr.String())
	}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p struct {
			ImportPath string
			Imports    []string
			DepOnly    bool
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			return nil, nil, err
		}
		g[p.ImportPath] = p.Imports
		if !p.DepOnly {
			roots = append(roots, p.ImportPath)
		}
	}
	return g, roots, nil
}

// Under reports whether path is one of the module's packages prefix (a
// path relative to the module, e.g. "enroll") or below it.
func Under(path, prefix string) bool {
	p := Module + "/" + prefix
	return path == p || strings.HasPrefix(path, p+"/")
}

// Violations returns, for every root that depends on a package forbidden
// reports true for, one chain of imports from the root to it.
func Violations(g Graph, roots []string, forbidden func(string) bool) []string {
	var out []string
	for _, root := range roots {
		if chain := find(g, root, forbidden); chain != nil {
			out = append(out, strings.Join(chain, " -> "))
		}
	}
	return out
}

// find is a breadth-first search for the shortest chain of imports from
// root to a forbidden package.
func find(g Graph, root string, forbidden func(string) bool) []string {
	prev := map[string]string{root: ""}
	queue := []string{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if forbidden(p) {
			var chain []string
			for q := p; q != ""; q = prev[q] {
				chain = append([]string{q}, chain...)
			}
			return chain
		}
		for _, imp := range g[p] {
			if _, seen := prev[imp]; !seen {
				prev[imp] = p
				queue = append(queue, imp)
			}
		}
	}
	return nil
}
