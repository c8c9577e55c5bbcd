#!/usr/bin/env bash
# End-to-end test of Moat on a kind cluster, as the only CNI (standalone) or
# chained after kind's kindnet.
#
#   kind-tests/run.sh                  build, create, install, test, delete
#   KEEP=1 kind-tests/run.sh           keep the cluster afterwards
#   MODE=chained kind-tests/run.sh     Moat chained after kindnet
#   CONFORMANCE=1 kind-tests/run.sh    also the conformance cases (conformance.sh)
#   E2E_NETPOL=1 kind-tests/run.sh     also run the upstream NetworkPolicy e2e suite
#
# Steps: preflight (docker, kind, kubectl, kernel >= 6.6) -> docker build of
# the Moat image -> kind cluster (kind-standalone.yaml: no default CNI;
# kind-chained.yaml: kindnet; 1 control plane, 2 workers) -> kind load of the
# image -> apply the manifests
# (moat-config cni-mode set to $MODE) -> wait for the DaemonSet rollout, the
# conflist on every node, nodes Ready and CoreDNS -> MoatPolicy CRD
# validation -> netpol-smoke.sh -> churn-smoke.sh -> optional conformance
# and upstream e2e. On failure, diagnostics go to $ARTIFACTS/failure-*. The
# cluster is deleted on exit unless KEEP=1 (or REUSE_CLUSTER=1 was used).
#
# Environment (defaults):
#   MODE=standalone           standalone | chained
#   CLUSTER=moat-e2e          kind cluster name
#   MOAT_IMAGE=moat:dev       image built, loaded and put into the manifests
#   SKIP_BUILD=0              1: use an existing local $MOAT_IMAGE
#   KIND_NODE_IMAGE=          kindest/node image (kind's default if empty)
#   REUSE_CLUSTER=0           1: use an existing cluster $CLUSTER (never deleted)
#   KEEP=0                    1: keep the cluster (and the smoke namespaces)
#   TIMEOUT=300s              each readiness wait
#   ARTIFACTS=kind-tests/_artifacts   kubeconfig, diagnostics, e2e reports
#   E2E_NETPOL=0              1: run the upstream NetworkPolicy e2e tests
#   E2E_TEST=                 path to e2e.test (else looked up on PATH)
#   E2E_PARALLEL=4            ginkgo nodes for the e2e run
#   E2E_FOCUS, E2E_SKIP       ginkgo regexes (NetworkPolicy tests, minus SCTP)
#   CHURN=1                   0: skip churn-smoke.sh
#   CONFORMANCE=0             1: run conformance.sh (moat-conformance --kube)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

MODE=${MODE:-standalone}
CLUSTER=${CLUSTER:-moat-e2e}
MOAT_IMAGE=${MOAT_IMAGE:-moat:dev}
SKIP_BUILD=${SKIP_BUILD:-0}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
REUSE_CLUSTER=${REUSE_CLUSTER:-0}
# Routes between nodes: moatd's (standalone) or kindnet's (chained).
ROUTING=direct
KEEP=${KEEP:-0}
TIMEOUT=${TIMEOUT:-300s}
ARTIFACTS=${ARTIFACTS:-$HERE/_artifacts}
E2E_NETPOL=${E2E_NETPOL:-0}
E2E_TEST=${E2E_TEST:-}
E2E_PARALLEL=${E2E_PARALLEL:-4}
E2E_FOCUS=${E2E_FOCUS:-'\[Feature:NetworkPolicy\]'}
E2E_SKIP=${E2E_SKIP:-'SCTP'}
CHURN=${CHURN:-1}
CONFORMANCE=${CONFORMANCE:-0}
MIN_KERNEL=(6 6)

CREATED=0
STARTED=$SECONDS

step() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# --- preflight ----------------------------------------------------------------
((BASH_VERSINFO[0] >= 4)) || die "bash >= 4 needed (on macOS: brew install bash)"
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"
}
case $MODE in
  standalone) CONFLIST=10-moat.conflist ;;
  chained) CONFLIST=00-moat-chained.conflist; ROUTING=none ;;
  *) die "MODE must be standalone or chained, not '$MODE'" ;;
esac
step "preflight"
need docker "Install Docker: https://docs.docker.com/engine/install/"
need kind "Install kind (>= 0.23): https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "Install kubectl: https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 ||
  die "the Docker daemon is not reachable ('docker info' failed): start Docker, or add your user to the docker group"
kernel=$(docker info --format '{{.KernelVersion}}')
IFS=. read -r kmaj kmin _ <<<"$kernel"
kmin=${kmin%%[!0-9]*}
if ((kmaj < MIN_KERNEL[0] || (kmaj == MIN_KERNEL[0] && ${kmin:-0} < MIN_KERNEL[1]))); then
  die "the Docker host's kernel is $kernel; Moat needs >= ${MIN_KERNEL[0]}.${MIN_KERNEL[1]} (TCX). kind nodes share the host's kernel."
fi
info "docker $(docker version --format '{{.Server.Version}}'), kernel $kernel"
info "$(kind version)"
info "kubectl $(kubectl version --client 2>/dev/null | head -1)"

mkdir -p "$ARTIFACTS"
# A kubeconfig of our own: the user's ~/.kube/config is left alone.
export KUBECONFIG="$ARTIFACTS/kubeconfig"

# --- diagnostics and cleanup --------------------------------------------------
collect_logs() {
  local dir
  dir="$ARTIFACTS/failure-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$dir"
  echo "collecting diagnostics into $dir" >&2
  kubectl get nodes -o wide >"$dir/nodes.txt" 2>&1
  kubectl get pods -A -o wide >"$dir/pods.txt" 2>&1
  kubectl get events -A --sort-by=.lastTimestamp >"$dir/events.txt" 2>&1
  kubectl get networkpolicies -A -o yaml >"$dir/networkpolicies.yaml" 2>&1
  kubectl -n kube-system describe ds/moat >"$dir/moat-ds.describe.txt" 2>&1
  kubectl -n kube-system describe pods -l app.kubernetes.io/name=moat >"$dir/moat-pods.describe.txt" 2>&1
  kubectl -n kube-system logs ds/moat -c moatd --tail=-1 >"$dir/moat-ds.log" 2>&1
  local pod node
  for pod in $(kubectl -n kube-system get pods -l app.kubernetes.io/name=moat -o name 2>/dev/null); do
    node=$(kubectl -n kube-system get "$pod" -o jsonpath='{.spec.nodeName}' 2>/dev/null)
    node=${node:-${pod#pod/}}
    kubectl -n kube-system logs "$pod" -c moatd --tail=-1 >"$dir/$node.moatd.log" 2>&1
    kubectl -n kube-system logs "$pod" -c moatd --previous --tail=-1 >"$dir/$node.moatd.previous.log" 2>&1
    kubectl -n kube-system logs "$pod" -c mount-bpffs >"$dir/$node.mount-bpffs.log" 2>&1
    {
      local cmd
      for cmd in "status -o json" "endpoint list -o wide" "identity list -o wide" \
        "policy -o json" "flows -o wide --since 30m" "bpf counters"; do
        echo "### moatctl $cmd"
        # shellcheck disable=SC2086 # $cmd is split into arguments on purpose
        kubectl -n kube-system exec "${pod#pod/}" -c moatd -- moatctl $cmd 2>&1
        echo
      done
    } >"$dir/$node.moatctl.txt" 2>&1
  done
  for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
    docker exec "$node" sh -c '
      echo "### /etc/cni/net.d"; ls -l /etc/cni/net.d; cat /etc/cni/net.d/*.conflist
      echo "### /opt/cni/bin"; ls -l /opt/cni/bin
      echo "### bpffs"; grep " bpf " /proc/mounts; ls -la /sys/fs/bpf/moat
      echo "### addresses"; ip -br addr
      echo "### routes"; ip route
      echo "### links"; ip -br link
      echo "### iptables nat"; iptables -t nat -S 2>/dev/null | head -200
      echo "### moatd masquerade"; nft list table inet moat-masquerade 2>&1
    ' >"$dir/$node.host.txt" 2>&1
  done
  kind export logs "$dir/kind" --name "$CLUSTER" >/dev/null 2>&1
  echo "---- last moatd log lines (all nodes) ----" >&2
  tail -n 20 "$dir"/*.moatd.log >&2 2>/dev/null
  echo "diagnostics: $dir" >&2
}

cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)); then
    printf '\nFAILED (exit %s) after %ss\n' "$rc" "$((SECONDS - STARTED))" >&2
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then collect_logs; fi
  fi
  if ((CREATED)) && [[ $KEEP != 1 ]]; then
    step "deleting cluster $CLUSTER (KEEP=1 keeps it)"
    kind delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
  elif kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    printf '\ncluster %s kept. Use it with:\n  export KUBECONFIG=%s\n  kubectl -n kube-system exec ds/moat -c moatd -- moatctl status\nDelete it with:\n  kind delete cluster --name %s\n' \
      "$CLUSTER" "$KUBECONFIG" "$CLUSTER"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- image --------------------------------------------------------------------
if [[ $SKIP_BUILD == 1 ]]; then
  step "using existing image $MOAT_IMAGE (SKIP_BUILD=1)"
  docker image inspect "$MOAT_IMAGE" >/dev/null 2>&1 || die "image $MOAT_IMAGE not found locally"
else
  step "building $MOAT_IMAGE (first build: ~15-30 min; nightly toolchain, bpf-linker, workspace)"
  DOCKER_BUILDKIT=1 docker build -t "$MOAT_IMAGE" -f "$REPO/Dockerfile" "$REPO"
fi

# --- cluster ------------------------------------------------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  [[ $REUSE_CLUSTER == 1 ]] ||
    die "a kind cluster named $CLUSTER already exists: delete it (kind delete cluster --name $CLUSTER) or set REUSE_CLUSTER=1"
  step "reusing existing cluster $CLUSTER"
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
  step "creating kind cluster $CLUSTER ($MODE: kind-$MODE.yaml; 1 control plane + 2 workers)"
  args=(create cluster --name "$CLUSTER" --config "$HERE/kind-$MODE.yaml" --kubeconfig "$KUBECONFIG" --wait 0s)
  [[ -z $KIND_NODE_IMAGE ]] || args+=(--image "$KIND_NODE_IMAGE")
  CREATED=1
  kind "${args[@]}"
fi
mapfile -t NODES < <(kind get nodes --name "$CLUSTER")
info "nodes: ${NODES[*]}"

step "loading $MOAT_IMAGE into the nodes"
kind load docker-image "$MOAT_IMAGE" --name "$CLUSTER"

# --- install Moat -------------------------------------------------------------
step "installing Moat (manifests/moat.yaml with image $MOAT_IMAGE, cni-mode $MODE)"
had_moat=0
kubectl -n kube-system get ds moat >/dev/null 2>&1 && had_moat=1
bash "$REPO/manifests/build.sh" --stdout |
  sed -e "s#image: moat:dev#image: ${MOAT_IMAGE}#" -e "s#^  cni-mode: standalone\$#  cni-mode: ${MODE}#" \
    -e "s#^  routing: direct\$#  routing: ${ROUTING}#" |
  kubectl apply -f -
[[ $(kubectl -n kube-system get configmap moat-config -o jsonpath='{.data.cni-mode}') == "$MODE" ]] ||
  die "moat-config cni-mode is not $MODE"
if ((had_moat)); then
  # Reused cluster: the image tag may be unchanged while its content is new.
  kubectl -n kube-system rollout restart ds/moat
fi
kubectl wait --for=condition=Established crd/moatpolicies.moat.io --timeout=60s

step "waiting for the DaemonSet rollout (moatd ready on every node)"
kubectl -n kube-system rollout status ds/moat --timeout="$TIMEOUT"
kubectl -n kube-system get pods -l app.kubernetes.io/name=moat -o wide

step "checking the CNI install on every node"
for node in "${NODES[@]}"; do
  docker exec "$node" test -x /opt/cni/bin/moat-cni || die "$node: /opt/cni/bin/moat-cni missing"
  docker exec "$node" test -x /opt/cni/bin/moat-ipam || die "$node: /opt/cni/bin/moat-ipam missing"
  # The conflist appears once moatd serves (chained: once kindnet wrote its own).
  deadline=$((SECONDS + 120))
  until docker exec "$node" test -s "/etc/cni/net.d/$CONFLIST"; do
    ((SECONDS < deadline)) || die "$node: /etc/cni/net.d/$CONFLIST missing after 120s"
    sleep 2
  done
  docker exec "$node" grep -q '"type": "moat-cni"' "/etc/cni/net.d/$CONFLIST" ||
    die "$node: $CONFLIST has no moat-cni entry"
  subnet=$(docker exec "$node" grep -o '"subnet": *"[^"]*"' "/etc/cni/net.d/$CONFLIST" | head -1)
  info "$node: moat-cni, moat-ipam, $CONFLIST ($subnet)"
done

step "waiting for every node to be Ready (kubelet sees the CNI config)"
kubectl wait --for=condition=Ready nodes --all --timeout="$TIMEOUT"

step "waiting for CoreDNS (first pods on the Moat network, pod -> API server via ClusterIP)"
kubectl -n kube-system rollout status deploy/coredns --timeout="$TIMEOUT"

# --- CRD validation -----------------------------------------------------------
step "MoatPolicy CRD: the API server accepts a valid object and rejects invalid ones"
crd_valid='apiVersion: moat.io/v1alpha1
kind: MoatPolicy
metadata: {name: crd-check, namespace: default}
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions:
      - {key: tier, operator: In, values: [frontend]}
  mode: audit
  defaultDeny: true
  externalGroups:
    - {name: payments-api, cidrs: [203.0.113.0/24, "2001:db8::/32"]}
  egress:
    - to: [{group: payments-api}]
      ports: [{protocol: TCP, port: 443}]'
kubectl apply --dry-run=server -f - <<<"$crd_valid" >/dev/null ||
  die "a valid MoatPolicy was rejected"
info "valid object accepted"
crd_reject() { # description, sed expression turning the valid object into an invalid one
  local out
  if out=$(sed "$2" <<<"$crd_valid" | kubectl apply --dry-run=server -f - 2>&1); then
    die "invalid MoatPolicy ($1) was accepted"
  fi
  grep -Eq 'Invalid value|Unsupported value|Required value|Duplicate value|Invalid' <<<"$out" ||
    die "invalid MoatPolicy ($1) failed for another reason: $out"
  info "rejected: $1"
}
crd_reject "unknown mode" 's/mode: audit/mode: relaxed/'
crd_reject "malformed CIDR" 's#203.0.113.0/24#203.0.113.0#'
crd_reject "In without values" 's/operator: In, values: \[frontend\]/operator: In/'
crd_reject "bad group name" 's/name: payments-api/name: Payments_API/'
crd_reject "no podSelector" '/podSelector:/,/frontend/d'
crd_reject "rule naming an undefined group" 's/group: payments-api/group: nowhere/'
crd_reject "unknown protocol" 's/protocol: TCP/protocol: ICMP/'

# --- NetworkPolicy smoke test -------------------------------------------------
step "NetworkPolicy smoke test (kind-tests/netpol-smoke.sh)"
KEEP=$KEEP TIMEOUT=$TIMEOUT bash "$HERE/netpol-smoke.sh"

# --- churn ----------------------------------------------------------------------
if [[ $CHURN == 1 ]]; then
  step "churn smoke test (kind-tests/churn-smoke.sh)"
  KEEP=$KEEP TIMEOUT=$TIMEOUT bash "$HERE/churn-smoke.sh"
fi

# --- conformance cases (optional) ----------------------------------------------
if [[ $CONFORMANCE == 1 ]]; then
  step "conformance cases (kind-tests/conformance.sh: moat-conformance --kube)"
  bash "$HERE/conformance.sh"
fi

# --- upstream e2e (optional) --------------------------------------------------
run_e2e_netpol() {
  local version e2e report="$ARTIFACTS/e2e"
  version=$(kubectl get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
  mkdir -p "$report"
  e2e=${E2E_TEST:-$(command -v e2e.test || true)}
  if [[ -n $e2e ]]; then
    local -a test_args=(--kubeconfig="$KUBECONFIG" --provider=skeleton --report-dir="$report")
    if command -v ginkgo >/dev/null 2>&1; then
      info "ginkgo --nodes=$E2E_PARALLEL $e2e (server $version)"
      ginkgo --nodes="$E2E_PARALLEL" --timeout=3h --focus="$E2E_FOCUS" --skip="$E2E_SKIP" \
        "$e2e" -- "${test_args[@]}"
    else
      info "$e2e, serially (put ginkgo on PATH to run in parallel) (server $version)"
      "$e2e" --ginkgo.focus="$E2E_FOCUS" --ginkgo.skip="$E2E_SKIP" --ginkgo.timeout=3h "${test_args[@]}"
    fi
  elif command -v kubetest2 >/dev/null 2>&1 && command -v kubetest2-tester-ginkgo >/dev/null 2>&1; then
    info "kubetest2 noop --test=ginkgo, test package $version"
    kubetest2 noop --kubeconfig="$KUBECONFIG" --artifacts="$report" --test=ginkgo -- \
      --test-package-version="$version" --focus-regex="$E2E_FOCUS" --skip-regex="$E2E_SKIP" \
      --parallel="$E2E_PARALLEL"
  else
    die "E2E_NETPOL=1 needs e2e.test (and ideally ginkgo) or kubetest2 + kubetest2-tester-ginkgo.
  e2e.test and ginkgo for server $version:
    curl -L https://dl.k8s.io/$version/kubernetes-test-linux-\$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/').tar.gz | tar xz
    export E2E_TEST=\$PWD/kubernetes/test/bin/e2e.test PATH=\$PWD/kubernetes/test/bin:\$PATH
  or kubetest2:
    go install sigs.k8s.io/kubetest2/...@latest"
  fi
}
if [[ $E2E_NETPOL == 1 ]]; then
  step "upstream NetworkPolicy e2e (focus $E2E_FOCUS, skip $E2E_SKIP)"
  run_e2e_netpol
fi

step "PASSED in $((SECONDS - STARTED))s"
