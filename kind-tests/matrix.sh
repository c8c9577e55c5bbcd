#!/usr/bin/env bash
# run.sh against both pinned kind releases (versions.env) in both modes, one cluster at a time:
#
#   old (kind < v0.24.0: kindnet without NetworkPolicy)  standalone: the whole suite
#                                                        chained:    the whole suite
#   new (kind >= v0.24.0: kindnet enforcing NetworkPolicy) standalone: the whole suite
#                                                        chained:    moatd refuses to chain
#
#   KIND_OLD=<kind at KIND_OLD_VERSION> KIND_NEW=<kind at KIND_NEW_VERSION> kind-tests/matrix.sh
#
# Environment (defaults):
#   KIND_OLD, KIND_NEW   the two kind binaries (kind-<version> if on PATH, else kind); run.sh
#                        refuses one that is not the pinned release
#   PINS="old new"       which pins to run
#   MODES="standalone chained"
#   ARTIFACTS=kind-tests/_artifacts   each run writes under $ARTIFACTS/<pin>-<mode>/
# Anything else run.sh reads passes through (SKIP_BUILD, MOAT_IMAGE, TIMEOUT, CHURN, ...); the
# image is built by the first run only. Each run uses its own cluster, moat-e2e-<pin>-<mode>,
# deleted at its end unless KEEP=1. Exit status: 0 only if every run passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=kind-tests/versions.env
. "$HERE/versions.env"

PINS=${PINS:-old new}
MODES=${MODES:-standalone chained}
ARTIFACTS=${ARTIFACTS:-$HERE/_artifacts}
SKIP_BUILD=${SKIP_BUILD:-0}

# kind_binary PIN: $KIND_OLD / $KIND_NEW, else kind-<version> on PATH, else kind.
kind_binary() {
  local set version
  case $1 in
    old) set=${KIND_OLD:-} version=$KIND_OLD_VERSION ;;
    new) set=${KIND_NEW:-} version=$KIND_NEW_VERSION ;;
    *) printf 'matrix: unknown pin %s (old or new)\n' "$1" >&2; return 1 ;;
  esac
  if [[ -n $set ]]; then
    echo "$set"
  elif command -v "kind-$version" >/dev/null 2>&1; then
    echo "kind-$version"
  else
    echo kind
  fi
}

results=()
failed=0
for pin in $PINS; do
  kind=$(kind_binary "$pin")
  for mode in $MODES; do
    printf '\n######## %s (%s) %s ########\n' "$pin" "$kind" "$mode"
    if KIND_PIN=$pin KIND=$kind MODE=$mode CLUSTER="moat-e2e-$pin-$mode" \
      ARTIFACTS="$ARTIFACTS/$pin-$mode" SKIP_BUILD=$SKIP_BUILD bash "$HERE/run.sh"; then
      results+=("PASS  $pin ($kind) $mode")
    else
      results+=("FAIL  $pin ($kind) $mode (diagnostics: $ARTIFACTS/$pin-$mode)")
      failed=$((failed + 1))
    fi
    # The image is built once.
    SKIP_BUILD=1
  done
done

printf '\n######## kind matrix ########\n'
printf '%s\n' "${results[@]}"
((failed == 0))
