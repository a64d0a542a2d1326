package cluster

// BeforeReplay lets the tests of package cluster_test act between a
// CONNECT's claim of a session record and its replay.
var BeforeReplay = &beforeReplay

// SubjectsOverlap is subjectsOverlap, for its table test.
var SubjectsOverlap = subjectsOverlap

// DisjointGroups is disjointGroups, for its test.
var DisjointGroups = disjointGroups
