#!/usr/bin/env bash
# Repeats, at the end of a failed `make test`, what each failing test printed: cargo prints a
# test's panic in the middle of the run, thousands of lines before the summary that names the
# failing binary, and CI shows only the end of the output.
#
#   scripts/test-failures.sh LOG     (LOG: the whole output of `cargo test`)
set -euo pipefail
log=${1:?usage: scripts/test-failures.sh LOG}
echo
echo "=== what the failing tests printed (from $log) ==="
# A binary's failures section runs from "failures:" + "---- <test> stdout ----" to the
# "failures:" line that lists their names; the name of the binary is the "Running" line before.
awk '
  /^     Running / { running = $0 }
  /^failures:$/ && !inside { pending = 1; next }
  pending && /^---- / { inside = 1; pending = 0; print running }
  pending && !/^---- / && !/^$/ { pending = 0 }
  inside && /^failures:$/ { inside = 0; next }
  inside { print }
' "$log" | head -c 12000
echo
grep -E '^error: [0-9]+ targets? failed|^    `-p ' "$log" || true
