#!/usr/bin/env bash
# The upstream ClusterNetworkPolicy conformance profile (kubernetes-sigs/network-policy-api,
# Go test suite) against the cluster of KUBECONFIG with Moat installed: installs the
# ClusterNetworkPolicy CRD from manifests/crds/, checks out the upstream repository at the
# commit conformance/cases/cnp-cases.json was translated from, and runs
#   go test ./conformance -run TestConformanceProfiles -args
#     --conformance-profiles=ClusterNetworkPolicy --supported-features=...
# writing the upstream report to kind-tests/_artifacts/cnp-conformance-report.yaml.
#
#   KUBECONFIG=kind-tests/_artifacts/kubeconfig kind-tests/cnp-conformance.sh
#
# Environment (defaults):
#   KUBECONFIG=kind-tests/_artifacts/kubeconfig   (the one kind-tests/run.sh writes)
#   NPAPI_COMMIT=0eec1b0e5fa92715b4c0f4c48d3c8d2913ed2159   upstream commit (the cases' source)
#   FEATURES=ClusterNetworkPolicy,ClusterNetworkPolicyNamedPorts,ClusterNetworkPolicyEgressNodePeers
#   WORK=kind-tests/_artifacts/network-policy-api
#
# Needs: git, go (the version upstream's go.mod names), kubectl. Not run on Moat's build
# machines (no cluster there); the same cases run offline and on the datapath in `make test`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export KUBECONFIG=${KUBECONFIG:-$HERE/_artifacts/kubeconfig}
NPAPI_COMMIT=${NPAPI_COMMIT:-0eec1b0e5fa92715b4c0f4c48d3c8d2913ed2159}
FEATURES=${FEATURES:-ClusterNetworkPolicy,ClusterNetworkPolicyNamedPorts,ClusterNetworkPolicyEgressNodePeers}
WORK=${WORK:-$HERE/_artifacts/network-policy-api}
REPORT=$HERE/_artifacts/cnp-conformance-report.yaml

die() { printf 'cnp-conformance: %s\n' "$*" >&2; exit 2; }

for tool in git go kubectl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
[[ -f $KUBECONFIG ]] || die "no kubeconfig at $KUBECONFIG (run KEEP=1 kind-tests/run.sh first, or set KUBECONFIG)"
kubectl -n kube-system rollout status ds/moat --timeout=30s >/dev/null ||
  die "Moat is not installed and Ready on this cluster (kubectl -n kube-system get ds moat)"

crd=$REPO/manifests/crds/clusternetworkpolicies.policy.networking.k8s.io.yaml
[[ -f $crd ]] || die "missing $crd"
kubectl apply -f "$crd"
kubectl wait --for=condition=Established --timeout=60s \
  crd/clusternetworkpolicies.policy.networking.k8s.io

mkdir -p "$(dirname "$WORK")"
if [[ ! -d $WORK/.git ]]; then
  git clone --quiet https://github.com/kubernetes-sigs/network-policy-api.git "$WORK"
fi
git -C "$WORK" fetch --quiet origin "$NPAPI_COMMIT" 2>/dev/null || true
git -C "$WORK" checkout --quiet "$NPAPI_COMMIT"

cd "$WORK"
status=0
go test ./conformance -run TestConformanceProfiles -count=1 -timeout=60m -v -args \
  --conformance-profiles=ClusterNetworkPolicy \
  --supported-features="$FEATURES" \
  --organization=moat --project=moat --url=https://example.invalid/moat \
  --version="$(git -C "$REPO" rev-parse --short HEAD)" --contact=maintainers \
  --report-output="$REPORT" || status=$?
echo "cnp-conformance: upstream suite exit status $status; report: $REPORT"
exit "$status"
