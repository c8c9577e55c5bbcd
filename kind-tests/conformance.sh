#!/usr/bin/env bash
# The NetworkPolicy conformance cases (netpol-cases/v1, conformance/cases/) on the cluster of KUBECONFIG,
# with Moat installed: moat-conformance --kube creates namespaces x, y, z, pods a, b, c and a
# Service per pod, applies each case's policies and labels through the API, probes with
# kubectl exec, and prints one PASS/FAIL line per case and the totals.
#
#   KUBECONFIG=kind-tests/_artifacts/kubeconfig kind-tests/conformance.sh [moat-conformance args]
#
# e.g. `kind-tests/conformance.sh --filter k8s-e2e` or `... --direct`.
#
# Environment (defaults):
#   KUBECONFIG=kind-tests/_artifacts/kubeconfig   (the one kind-tests/run.sh writes)
#   CASES=<repo>/conformance/cases/netpol-cases.json
#   MOAT_CONFORMANCE=         a moat-conformance binary; else `cargo build --release` when
#                             cargo is present, else copied out of $MOAT_IMAGE (Linux hosts)
#   MOAT_IMAGE=moat:dev
#   REPORT=kind-tests/_artifacts/conformance-kube.json
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export KUBECONFIG=${KUBECONFIG:-$HERE/_artifacts/kubeconfig}
CASES=${CASES:-$REPO/conformance/cases/netpol-cases.json}
MOAT_IMAGE=${MOAT_IMAGE:-moat:dev}
REPORT=${REPORT:-$HERE/_artifacts/conformance-kube.json}
MOAT_CONFORMANCE=${MOAT_CONFORMANCE:-}

die() { printf 'conformance: %s\n' "$*" >&2; exit 2; }

command -v kubectl >/dev/null 2>&1 || die "kubectl not found on PATH"
[[ -f $KUBECONFIG ]] || die "no kubeconfig at $KUBECONFIG (run KEEP=1 kind-tests/run.sh first, or set KUBECONFIG)"
[[ -f $CASES ]] || die "case file $CASES not found (set CASES=<path to netpol-cases.json>)"
kubectl -n kube-system rollout status ds/moat --timeout=30s >/dev/null ||
  die "Moat is not installed and Ready on this cluster (kubectl -n kube-system get ds moat)"

if [[ -z $MOAT_CONFORMANCE ]]; then
  if command -v cargo >/dev/null 2>&1; then
    (cd "$REPO" && cargo build --release -p moat-conformance)
    MOAT_CONFORMANCE=$REPO/target/release/moat-conformance
  else
    command -v docker >/dev/null 2>&1 || die "need cargo, docker (to copy it out of $MOAT_IMAGE) or MOAT_CONFORMANCE"
    mkdir -p "$HERE/_artifacts"
    id=$(docker create "$MOAT_IMAGE")
    docker cp "$id:/opt/moat/bin/moat-conformance" "$HERE/_artifacts/moat-conformance"
    docker rm "$id" >/dev/null
    MOAT_CONFORMANCE=$HERE/_artifacts/moat-conformance
  fi
fi

mkdir -p "$(dirname "$REPORT")"
exec "$MOAT_CONFORMANCE" --kube --cases "$CASES" --report "$REPORT" "$@"
