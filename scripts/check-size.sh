#!/usr/bin/env bash
# Refuses a change that would make a submission too big to land: a tracked or
# staged file over 1 MiB, a binary that is not an allowed image, or more than
# 20 MiB of diffs since BASE (default origin of this session: the merge base
# with main's first parent at session start, or HEAD~50). Run before commits;
# the size limits of a submission are 512 MiB packed and 256 MiB of diffs, and
# a session's work that exceeds them is lost whole.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
base=${1:-$(git rev-list -1 --before='6 hours ago' HEAD 2>/dev/null || true)}
[ -n "$base" ] || base=$(git rev-list --max-parents=0 HEAD | tail -n1)
fail=0
# every file in the index (what the next commit holds)
while IFS= read -r f; do
  [ -f "$f" ] || continue
  sz=$(stat -c %s "$f")
  if [ "$sz" -gt 1048576 ]; then echo "too big to commit: $f ($sz bytes)"; fail=1; fi
  case "$f" in
    *.png|*.svg|*.jpg) [ "$sz" -le 400000 ] || { echo "image over 400 KB: $f"; fail=1; } ;;
    *) if [ "$sz" -gt 0 ] && ! grep -Iq . "$f" 2>/dev/null && [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ]; then echo "executable committed: $f"; fail=1; fi ;;
  esac
done < <(git ls-files --cached)
lines=$(git diff "$base" --cached --numstat | awk '$1!="-"{s+=$1+$2} END{print s+0}')
binaries=$(git diff "$base" --cached --numstat | awk '$1=="-"' | wc -l)
diffbytes=$(git log --format= -p "$base"..HEAD | wc -c)
echo "since $base: $lines changed lines in the index, $binaries binary files, $diffbytes bytes of committed diffs"
if [ "$diffbytes" -gt 20971520 ]; then echo "committed diffs over 20 MiB since $base: find what was committed by mistake"; fail=1; fi
exit $fail
