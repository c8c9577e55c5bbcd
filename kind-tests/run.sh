#!/usr/bin/env bash
# End-to-end test of Moat on a kind cluster, as the only CNI (standalone) or
# chained after kind's kindnet.
#
#   kind-tests/run.sh                  build, create, install, test, delete
#   KEEP=1 kind-tests/run.sh           keep the cluster afterwards
#   MODE=chained kind-tests/run.sh     Moat chained after kindnet
#   KIND_PIN=old KIND=<that kind> kind-tests/run.sh   the other pinned kind release
#   CONFORMANCE=1 kind-tests/run.sh    also the conformance cases (conformance.sh)
#   E2E_NETPOL=1 kind-tests/run.sh     also run the upstream NetworkPolicy e2e suite
#   kind-tests/matrix.sh               both pinned kind releases x both modes
#
# kind releases (versions.env): KIND_PIN=new (the default) is a kind whose kindnet enforces
# NetworkPolicy itself (every release since v0.24.0); KIND_PIN=old is the last release whose
# kindnet does not. The kind binary must be the pinned release; the cluster uses that
# release's node image, pinned by digest. Chained after a kindnet that enforces NetworkPolicy,
# Moat must refuse (two enforcers; kind's kindnetd cannot be told to stop): MODE=chained on
# KIND_PIN=new checks that refusal (moatd up, not ready with the reason, no chained conflist)
# and stops there. Everything else runs the whole suite.
#
# Steps: preflight (docker, kind at the pinned release, kubectl, kernel >= 6.6)
# -> docker build of the Moat image -> kind cluster from the pinned node image
# (kind-standalone.yaml: no default CNI; kind-chained.yaml: kindnet; 1 control
# plane, 2 workers) -> kind load of the image -> kindnet check (standalone:
# none; chained: the pinned kindnetd image, and whether it enforces
# NetworkPolicy) -> apply the
# manifests (moat-config cni-mode set to $MODE) -> chained onto an enforcing
# kindnet: every moatd refuses, and the run ends -> wait for the DaemonSet rollout, the
# conflist on every node, nodes Ready and CoreDNS -> MoatPolicy CRD
# validation -> netpol-smoke.sh -> churn-smoke.sh -> optional conformance
# and upstream e2e. On failure, diagnostics go to $ARTIFACTS/failure-*. The
# cluster is deleted on exit unless KEEP=1 (or REUSE_CLUSTER=1 was used).
#
# Environment (defaults):
#   MODE=standalone           standalone | chained
#   KIND_PIN=new              new | old (versions.env) | none (any kind, its default image)
#   KIND=kind                 the kind binary (e.g. kind-<old version> next to kind-<new version>)
#   CLUSTER=moat-e2e          kind cluster name
#   MOAT_IMAGE=moat:dev       image built, loaded and put into the manifests
#   SKIP_BUILD=0              1: use an existing local $MOAT_IMAGE
#   KIND_NODE_IMAGE=          kindest/node image (the pin's, or kind's default with KIND_PIN=none)
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

# shellcheck source=kind-tests/versions.env
. "$HERE/versions.env"

MODE=${MODE:-standalone}
KIND_PIN=${KIND_PIN:-new}
KIND=${KIND:-kind}
case $KIND_PIN in
  old) PIN_VERSION=$KIND_OLD_VERSION PIN_NODE_IMAGE=$KIND_OLD_NODE_IMAGE PIN_KINDNETD=$KIND_OLD_KINDNETD ;;
  new) PIN_VERSION=$KIND_NEW_VERSION PIN_NODE_IMAGE=$KIND_NEW_NODE_IMAGE PIN_KINDNETD=$KIND_NEW_KINDNETD ;;
  none) PIN_VERSION='' PIN_NODE_IMAGE='' PIN_KINDNETD='' ;;
  *) printf 'ERROR: KIND_PIN must be new, old or none, not %s\n' "$KIND_PIN" >&2; exit 1 ;;
esac
CLUSTER=${CLUSTER:-moat-e2e}
MOAT_IMAGE=${MOAT_IMAGE:-moat:dev}
SKIP_BUILD=${SKIP_BUILD:-0}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-$PIN_NODE_IMAGE}
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

# seconds 300s|5m|300 -> 300 (the forms of TIMEOUT that kubectl's --timeout takes here).
seconds() {
  case $1 in
    *m) echo $((10#${1%m} * 60)) ;;
    *s) echo $((10#${1%s})) ;;
    *) echo $((10#$1)) ;;
  esac
}
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
need "$KIND" "Install kind ${PIN_VERSION:-$KIND_OLD_VERSION or later}: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "Install kubectl: https://kubernetes.io/docs/tasks/tools/"
# `kind version` prints "kind vX.Y.Z goN.N.N linux/amd64".
kind_version=$("$KIND" version | awk '{print $2}')
if [[ -n $PIN_VERSION && $kind_version != "$PIN_VERSION" ]]; then
  die "$KIND is kind $kind_version; KIND_PIN=$KIND_PIN is kind $PIN_VERSION (kind-tests/versions.env). Get it with
    curl -Lo kind-$PIN_VERSION https://kind.sigs.k8s.io/dl/$PIN_VERSION/kind-linux-amd64 && chmod +x kind-$PIN_VERSION   # or kind-linux-arm64, kind-darwin-*
  or go install sigs.k8s.io/kind@$PIN_VERSION, then run with KIND=<path to it>; KIND_PIN=none runs any kind unchecked."
fi
docker info >/dev/null 2>&1 ||
  die "the Docker daemon is not reachable ('docker info' failed): start Docker, or add your user to the docker group"
kernel=$(docker info --format '{{.KernelVersion}}')
IFS=. read -r kmaj kmin _ <<<"$kernel"
kmin=${kmin%%[!0-9]*}
if ((kmaj < MIN_KERNEL[0] || (kmaj == MIN_KERNEL[0] && ${kmin:-0} < MIN_KERNEL[1]))); then
  die "the Docker host's kernel is $kernel; Moat needs >= ${MIN_KERNEL[0]}.${MIN_KERNEL[1]} (TCX). kind nodes share the host's kernel."
fi
info "docker $(docker version --format '{{.Server.Version}}'), kernel $kernel"
info "$("$KIND" version) (KIND_PIN=$KIND_PIN${PIN_VERSION:+: $PIN_VERSION}), node image ${KIND_NODE_IMAGE:-the default of this kind}"
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
  for node in $("$KIND" get nodes --name "$CLUSTER" 2>/dev/null); do
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
  "$KIND" export logs "$dir/kind" --name "$CLUSTER" >/dev/null 2>&1
  echo "---- last moatd log lines (all nodes) ----" >&2
  tail -n 20 "$dir"/*.moatd.log >&2 2>/dev/null
  echo "diagnostics: $dir" >&2
}

cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)); then
    printf '\nFAILED (exit %s) after %ss\n' "$rc" "$((SECONDS - STARTED))" >&2
    if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then collect_logs; fi
  fi
  if ((CREATED)) && [[ $KEEP != 1 ]]; then
    step "deleting cluster $CLUSTER (KEEP=1 keeps it)"
    "$KIND" delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
  elif "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    printf '\ncluster %s kept. Use it with:\n  export KUBECONFIG=%s\n  kubectl -n kube-system exec ds/moat -c moatd -- moatctl status\nDelete it with:\n  %s delete cluster --name %s\n' \
      "$CLUSTER" "$KUBECONFIG" "$KIND" "$CLUSTER"
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
if "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  [[ $REUSE_CLUSTER == 1 ]] ||
    die "a kind cluster named $CLUSTER already exists: delete it ($KIND delete cluster --name $CLUSTER) or set REUSE_CLUSTER=1"
  step "reusing existing cluster $CLUSTER"
  "$KIND" get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
else
  step "creating kind cluster $CLUSTER ($MODE: kind-$MODE.yaml; 1 control plane + 2 workers)"
  args=(create cluster --name "$CLUSTER" --config "$HERE/kind-$MODE.yaml" --kubeconfig "$KUBECONFIG" --wait 0s)
  [[ -z $KIND_NODE_IMAGE ]] || args+=(--image "$KIND_NODE_IMAGE")
  CREATED=1
  "$KIND" "${args[@]}"
fi
mapfile -t NODES < <("$KIND" get nodes --name "$CLUSTER")
info "nodes: ${NODES[*]}"

step "loading $MOAT_IMAGE into the nodes"
if ! "$KIND" load docker-image "$MOAT_IMAGE" --name "$CLUSTER"; then
  # Docker's containerd image store (the default since Docker 29) can make `kind load
  # docker-image` fail with "ctr: content digest ... not found" (kind issue #3795); the
  # workaround kind documents: save one platform, load the archive.
  platform=$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$MOAT_IMAGE")
  info "kind load docker-image failed; retrying through docker image save --platform $platform (needs Docker >= 28)"
  docker image save --platform "$platform" -o "$ARTIFACTS/moat-image.tar" "$MOAT_IMAGE"
  "$KIND" load image-archive "$ARTIFACTS/moat-image.tar" --name "$CLUSTER"
  rm -f "$ARTIFACTS/moat-image.tar"
fi

# --- kindnet --------------------------------------------------------------------
# What kind applied comes from the node image (/kind/manifests/default-cni.yaml), not from
# the kind binary. Standalone: no kindnet at all (disableDefaultCNI). Chained: kindnet's
# DaemonSet runs the kindnetd image the pin names, and whether that image enforces
# NetworkPolicy decides what Moat must do.
# kindnetd_enforces IMAGE: 0 when kind's kindnetd IMAGE enforces NetworkPolicy, 1 when it
# predates that, 2 when IMAGE is not kind's kindnetd with a vYYYYMMDD-<commit> tag.
kindnetd_enforces() {
  local image=${1%%@*} date
  [[ $image == *kindest/kindnetd:v* ]] || return 2
  date=${image##*:v}
  date=${date:0:8}
  [[ $date =~ ^[0-9]{8}$ ]] || return 2
  ((10#$date >= KINDNETD_NETPOL_SINCE)) && return 0
  return 1
}
KINDNET_ENFORCES=0
if [[ $MODE == standalone ]]; then
  if kubectl -n kube-system get daemonset kindnet >/dev/null 2>&1; then
    die "kindnet is installed although kind-standalone.yaml sets disableDefaultCNI: true"
  fi
  info "no kindnet (disableDefaultCNI: true)"
else
  kindnet_image=$(kubectl -n kube-system get daemonset kindnet \
    -o jsonpath='{.spec.template.spec.containers[?(@.name=="kindnet-cni")].image}') ||
    die "chained mode: no kindnet DaemonSet in kube-system (kind-chained.yaml keeps kind's default CNI)"
  if [[ -n $PIN_KINDNETD && $kindnet_image != "$PIN_KINDNETD" ]]; then
    die "kindnet runs $kindnet_image; kind-tests/versions.env pins $PIN_KINDNETD for kind $PIN_VERSION's node image"
  fi
  rc=0
  kindnetd_enforces "$kindnet_image" || rc=$?
  case $rc in
    0) KINDNET_ENFORCES=1; info "kindnet $kindnet_image enforces NetworkPolicy itself: Moat must refuse to chain onto it" ;;
    1) info "kindnet $kindnet_image does not enforce NetworkPolicy: Moat chains onto it" ;;
    *) die "kindnet runs $kindnet_image, not a kind kindnetd image these scripts know (kindest/kindnetd:vYYYYMMDD-<commit>)" ;;
  esac
fi

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

# --- chained onto an enforcing kindnet: the refusal ---------------------------------
# moatd must stay up (the pods Running, probes answering) but not ready, saying why, and
# leave the runtime on kindnet's own config: no 00-moat-chained.conflist on any node.
expect_refusal() {
  local node pod out ready deadline
  for node in "${NODES[@]}"; do
    deadline=$((SECONDS + $(seconds "$TIMEOUT")))
    until pod=$(kubectl -n kube-system get pods -l app.kubernetes.io/name=moat \
      --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null) &&
      [[ -n $pod ]] &&
      out=$(kubectl -n kube-system exec "$pod" -c moatd -- moatctl status 2>&1) &&
      grep -Eq 'not ready: +kindnet enforces NetworkPolicy itself' <<<"$out"; do
      ((SECONDS < deadline)) || die "$node: moatd does not report the refusal within $TIMEOUT:"$'\n'"${out:-no moat pod}"
      sleep 3
    done
    grep -E 'not ready:' <<<"$out" | sed 's/^/    /'
    docker exec "$node" test ! -e "/etc/cni/net.d/$CONFLIST" ||
      die "$node: /etc/cni/net.d/$CONFLIST exists: Moat chained onto an enforcing kindnet"
    ready=$(kubectl -n kube-system get pod "$pod" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
    [[ $ready != True ]] || die "$node: $pod is Ready although moatd refused to chain"
    info "$node: moatd up, not ready, no $CONFLIST"
  done
}
if ((KINDNET_ENFORCES)); then
  step "chained onto kindnet $kindnet_image: every moatd refuses (not ready, no $CONFLIST)"
  expect_refusal
  info "Moat cannot be chained after this kindnet; its NetworkPolicy tests run in standalone mode (MODE=standalone)"
  step "PASSED in $((SECONDS - STARTED))s (chained: refused, as it must be)"
  exit 0
fi

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
