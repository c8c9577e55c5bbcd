#!/usr/bin/env bash
# Deletes the kind cluster of kind-tests/run.sh (KEEP=1) and its kubeconfig.
#
#   kind-tests/down.sh            CLUSTER=moat-e2e by default
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=${CLUSTER:-moat-e2e}
ARTIFACTS=${ARTIFACTS:-$HERE/_artifacts}

command -v kind >/dev/null 2>&1 || { echo "kind not found on PATH" >&2; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER"
fi
rm -f "$ARTIFACTS/kubeconfig"
