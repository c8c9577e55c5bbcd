#!/usr/bin/env bash
# Deletes the kind cluster of kind-tests/run.sh (KEEP=1) and its kubeconfig.
#
#   kind-tests/down.sh            CLUSTER=moat-e2e by default, KIND=kind (the binary)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=${CLUSTER:-moat-e2e}
ARTIFACTS=${ARTIFACTS:-$HERE/_artifacts}
KIND=${KIND:-kind}

command -v "$KIND" >/dev/null 2>&1 || { echo "$KIND not found on PATH" >&2; exit 1; }
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  "$KIND" delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER"
fi
rm -f "$ARTIFACTS/kubeconfig"
