#!/usr/bin/env bash
# NetworkPolicy smoke test for a cluster whose CNI is Moat.
#
# kind-tests/run.sh runs it on a fresh kind cluster; it also runs on its own
# against any cluster with Moat installed (kubectl's current context, or
# KUBECONFIG) that has at least two schedulable worker nodes.
#
# Real pods (agnhost) on two nodes, a ClusterIP Service, then policies applied
# step by step; after each step every client/target/port/protocol combination
# is probed with `agnhost connect` (TCP and UDP, to the pod IP and to the
# ClusterIP, from the same node and from the other node), and drops are looked
# up in moatd's flow journal with `moatctl flows` on the node that dropped.
#
#   phase 0  no policy            everything connects (baseline connectivity)
#   phase 1  default deny ingress everything to the server times out; the drop
#                                 is in `moatctl flows --verdict dropped` with
#                                 reason default-deny and the policy's name;
#                                 kubelet probes still pass (server stays Ready);
#                                 a pod annotated moat.io/mode=audit is reachable
#                                 and the would-be drop is reported as AUDIT
#   phase 2  allow app=client     clients of the namespace reach TCP 8080 and
#            to TCP 8080, UDP 8081 UDP 8081 only; 9090, other pods and the same
#                                 labels in another namespace stay denied
#   phase 3  namespaceSelector    the other namespace's client reaches TCP 8080
#   phase 4  egress policy        clients may only send to TCP 8080: UDP 8081
#                                 now fails at the sender (egress drop in flows)
#   phase 5  policies deleted     everything connects again
#
# Each phase runs its whole matrix twice: first letting each check converge
# (policy propagation, up to CONVERGE_SECS), then once more with no retry,
# so a flapping verdict fails. Exit status: 0 only if every check matched.
#
# Environment: NS, NS_EXT (namespaces, recreated), AGNHOST_IMAGE,
# CONNECT_TIMEOUT (per probe, default 2s), CONVERGE_SECS (default 30),
# TIMEOUT (pod readiness, default 180s), KEEP=1 (keep the namespaces; they
# are always kept after a failure, for inspection).
set -euo pipefail

NS=${NS:-moat-smoke}
NS_EXT=${NS_EXT:-moat-smoke-ext}
AGNHOST_IMAGE=${AGNHOST_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.53}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-2s}
CONVERGE_SECS=${CONVERGE_SECS:-30}
TIMEOUT=${TIMEOUT:-180s}
KEEP=${KEEP:-0}
MOAT_NS=kube-system
MOAT_SELECTOR=app.kubernetes.io/name=moat

failures=0
passes=0
WORK=$(mktemp -d)

log() { printf '[smoke %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[smoke] ERROR: %s\n' "$*" >&2; exit 1; }
pass() { passes=$((passes + 1)); printf '  PASS %s\n' "$*"; }
fail() { failures=$((failures + 1)); printf '  FAIL %s\n' "$*"; }

((BASH_VERSINFO[0] >= 4)) || die "bash >= 4 needed (on macOS: brew install bash)"
command -v kubectl >/dev/null 2>&1 || die "kubectl not found on PATH"
kubectl version >/dev/null 2>&1 || die "cannot reach the cluster (kubectl version failed); set KUBECONFIG"
kubectl -n "$MOAT_NS" get ds moat >/dev/null 2>&1 || die "Moat is not installed (no DaemonSet $MOAT_NS/moat)"

# --- diagnostics and cleanup ------------------------------------------------
moat_pod_on() { # node -> name of the moat pod running there
  kubectl -n "$MOAT_NS" get pods -l "$MOAT_SELECTOR" --field-selector "spec.nodeName=$1" \
    -o jsonpath='{.items[0].metadata.name}'
}

diagnose() {
  echo "---- diagnostics ----"
  kubectl get pods -n "$NS" -o wide || true
  kubectl get pods -n "$NS_EXT" -o wide || true
  kubectl get svc,endpointslices -n "$NS" || true
  kubectl get networkpolicies -n "$NS" -o yaml || true
  local node pod
  for node in "${N1:-}" "${N2:-}"; do
    [[ -n $node ]] || continue
    pod=$(moat_pod_on "$node" 2>/dev/null) || continue
    echo "---- $node ($pod): moatctl endpoint list ----"
    kubectl -n "$MOAT_NS" exec "$pod" -c moatd -- moatctl endpoint list -o wide || true
    echo "---- $node ($pod): moatctl flows --since 15m ----"
    kubectl -n "$MOAT_NS" exec "$pod" -c moatd -- moatctl flows --since 15m -o wide || true
  done
}

finish() {
  local rc=$?
  set +e
  rm -rf "$WORK"
  if ((rc != 0)); then
    diagnose
    log "namespaces $NS and $NS_EXT kept for inspection"
  elif [[ $KEEP == 1 ]]; then
    log "KEEP=1: namespaces $NS and $NS_EXT kept"
  else
    kubectl delete namespace "$NS" "$NS_EXT" --ignore-not-found --wait=true --timeout=120s >/dev/null
  fi
  exit "$rc"
}
trap finish EXIT

# --- nodes ------------------------------------------------------------------
mapfile -t WORKERS < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
  -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
((${#WORKERS[@]} >= 2)) || die "need two worker nodes, found ${#WORKERS[@]}: ${WORKERS[*]:-none}"
N1=${WORKERS[0]}
N2=${WORKERS[1]}
log "server node: $N1, other node: $N2"

# --- workloads --------------------------------------------------------------
# pod NAME NAMESPACE NODE APP [MODE]: an agnhost porter serving TCP 8080,
# UDP 8081 and TCP 9090, pinned to NODE; clients run the same image and probe
# with `agnhost connect`.
pod() {
  local name=$1 ns=$2 node=$3 app=$4 mode=${5:-}
  local annotations=""
  [[ -z $mode ]] || annotations="  annotations: {moat.io/mode: $mode}"
  cat <<EOF
---
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: $ns
  labels: {app: $app, moat-smoke: "true"}
$annotations
spec:
  nodeSelector: {kubernetes.io/hostname: $node}
  enableServiceLinks: false
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: agnhost
      image: $AGNHOST_IMAGE
      args: [porter]
      env:
        - {name: SERVE_PORT_8080, value: tcp-8080}
        - {name: SERVE_UDP_PORT_8081, value: udp-8081}
        - {name: SERVE_PORT_9090, value: tcp-9090}
      ports:
        - {containerPort: 8080, protocol: TCP}
        - {containerPort: 8081, protocol: UDP}
        - {containerPort: 9090, protocol: TCP}
      # From the node (kubelet): must keep working under any policy.
      readinessProbe:
        tcpSocket: {port: 8080}
        periodSeconds: 2
        failureThreshold: 3
EOF
}

log "recreating namespaces $NS, $NS_EXT"
kubectl delete namespace "$NS" "$NS_EXT" --ignore-not-found --wait=true --timeout=180s >/dev/null
{
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: $NS, labels: {moat-smoke: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: $NS_EXT, labels: {moat-smoke: "true"}}
EOF
  pod server "$NS" "$N1" server
  pod server-audit "$NS" "$N1" server-audit audit
  pod client-same "$NS" "$N1" client
  pod client-cross "$NS" "$N2" client
  pod other-same "$NS" "$N1" other
  pod other-cross "$NS" "$N2" other
  pod client-ext "$NS_EXT" "$N2" client
  cat <<EOF
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: $NS}
spec:
  type: ClusterIP
  selector: {app: server}
  ports:
    - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}
    - {name: udp, port: 81, targetPort: 8081, protocol: UDP}
    - {name: tcp-alt, port: 90, targetPort: 9090, protocol: TCP}
EOF
} | kubectl apply -f - >/dev/null

log "waiting for the pods (image pull, CNI ADD through moat-cni)"
kubectl -n "$NS" wait --for=condition=Ready pod --all --timeout="$TIMEOUT" >/dev/null
kubectl -n "$NS_EXT" wait --for=condition=Ready pod --all --timeout="$TIMEOUT" >/dev/null

pod_ip() { kubectl -n "$1" get pod "$2" -o jsonpath='{.status.podIP}'; }
SERVER_IP=$(pod_ip "$NS" server)
AUDIT_IP=$(pod_ip "$NS" server-audit)
SVC_IP=$(kubectl -n "$NS" get svc server -o jsonpath='{.spec.clusterIP}')
declare -A IP
for p in client-same client-cross other-same other-cross; do IP[$p]=$(pod_ip "$NS" "$p"); done
IP[client-ext]=$(pod_ip "$NS_EXT" client-ext)
log "server $SERVER_IP (svc $SVC_IP), server-audit $AUDIT_IP"
for p in "${!IP[@]}"; do log "  $p ${IP[$p]}"; done
[[ -n $SERVER_IP && -n $SVC_IP && -n $AUDIT_IP ]] || die "missing pod or service IP"

# --- probes -----------------------------------------------------------------
# probe NS POD HOST PORT PROTO -> connected | timeout | refused | error: ...
# A policy drop shows as a timeout; anything else (refused, kubectl errors)
# never counts as "denied", so a broken exec cannot pass a deny check.
probe() {
  local out rc=0
  out=$(kubectl -n "$1" exec "$2" -c agnhost -- /agnhost connect "$3:$4" \
    "--protocol=$5" "--timeout=$CONNECT_TIMEOUT" 2>&1) || rc=$?
  if ((rc == 0)); then
    echo connected
  elif grep -q '^TIMEOUT' <<<"$out"; then
    echo timeout
  elif grep -q '^REFUSED' <<<"$out"; then
    echo refused
  else
    echo "error: $(tr '\n' ' ' <<<"$out")"
  fi
}

# check MODE WANT NS/POD LABEL HOST PORT PROTO; prints one PASS/FAIL line.
check() {
  local mode=$1 want=$2 client=$3 label=$4 host=$5 port=$6 proto=$7
  local ns=${client%%/*} pod=${client#*/} got deadline=0
  local desc="$client -> $label $host:$port/$proto"
  [[ $mode != converge ]] || deadline=$((SECONDS + CONVERGE_SECS))
  while :; do
    got=$(probe "$ns" "$pod" "$host" "$port" "$proto")
    if [[ ($want == allow && $got == connected) || ($want == deny && $got == timeout) ]]; then
      echo "PASS [$mode] $desc: $want"
      return 0
    fi
    ((SECONDS < deadline)) || break
    sleep 1
  done
  echo "FAIL [$mode] $desc: want $want, got $got"
}

PLAN=()
# expect WANT NS/POD: the six server targets (pod IP and ClusterIP x
# TCP 8080, UDP 8081, TCP 9090), each with its own WANT (allow|deny).
expect() {
  local client=$1 tcp=$2 udp=$3 alt=$4
  PLAN+=("$tcp|$client|server(pod)|$SERVER_IP|8080|tcp"
    "$udp|$client|server(pod)|$SERVER_IP|8081|udp"
    "$alt|$client|server(pod)|$SERVER_IP|9090|tcp"
    "$tcp|$client|server(svc)|$SVC_IP|80|tcp"
    "$udp|$client|server(svc)|$SVC_IP|81|udp"
    "$alt|$client|server(svc)|$SVC_IP|90|tcp")
}
expect_one() { PLAN+=("$1|$2|$3|$4|$5|$6"); } # WANT NS/POD LABEL HOST PORT PROTO

# Runs PLAN (clients in parallel, each client's checks in order), twice.
run_plan() {
  local mode client line want c label host port proto
  local -a clients
  mapfile -t clients < <(printf '%s\n' "${PLAN[@]}" | cut -d'|' -f2 | sort -u)
  for mode in converge strict; do
    for client in "${clients[@]}"; do
      (
        for line in "${PLAN[@]}"; do
          IFS='|' read -r want c label host port proto <<<"$line"
          [[ $c == "$client" ]] || continue
          check "$mode" "$want" "$c" "$label" "$host" "$port" "$proto"
        done
      ) >"$WORK/$mode.${client//\//_}" 2>&1 &
    done
    wait
    local f
    for f in "$WORK/$mode".*; do
      while IFS= read -r line; do
        case $line in
          PASS*) passes=$((passes + 1)) ;;
          FAIL*) failures=$((failures + 1)); printf '  %s\n' "$line" ;;
          *) printf '  %s\n' "$line" ;;
        esac
      done <"$f"
      rm -f "$f"
    done
  done
  log "  $((${#PLAN[@]} * 2)) probes run; failures so far: $failures"
  PLAN=()
}

# --- flow journal -----------------------------------------------------------
# flows_have NODE VERDICT NS/POD NEEDLE...: some line of
# `moatctl flows -o wide` on NODE contains every NEEDLE.
flows_have() {
  local node=$1 verdict=$2 podref=$3
  shift 3
  local mpod out line needle ok deadline=$((SECONDS + 20))
  mpod=$(moat_pod_on "$node")
  while :; do
    out=$(kubectl -n "$MOAT_NS" exec "$mpod" -c moatd -- \
      moatctl flows --verdict "$verdict" --pod "$podref" --since 15m -o wide 2>&1) || true
    while IFS= read -r line; do
      ok=1
      for needle in "$@"; do
        [[ $line == *"$needle"* ]] || { ok=0; break; }
      done
      if ((ok)); then
        pass "flows on $node: $verdict $podref [$*]"
        printf '       %s\n' "$line"
        return 0
      fi
    done <<<"$out"
    ((SECONDS < deadline)) || break
    sleep 2
  done
  fail "flows on $node: no $verdict record for $podref with all of [$*]; got:"
  tail -n 15 <<<"$out" | sed 's/^/       /'
}

apply_policy() { kubectl -n "$NS" apply -f - >/dev/null; }

# --- phase 0 ----------------------------------------------------------------
log "phase 0: no policy, everything connects (same node and across nodes)"
for c in client-same client-cross other-same other-cross; do expect "$NS/$c" allow allow allow; done
expect "$NS_EXT/client-ext" allow allow allow
expect_one allow "$NS/other-cross" "server-audit(pod)" "$AUDIT_IP" 8080 tcp
run_plan

# --- phase 1 ----------------------------------------------------------------
log "phase 1: default deny ingress in $NS"
apply_policy <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress}
spec:
  podSelector: {}
  policyTypes: [Ingress]
EOF
for c in client-same client-cross other-same other-cross; do expect "$NS/$c" deny deny deny; done
expect "$NS_EXT/client-ext" deny deny deny
# server-audit is in audit mode: allowed, reported as a would-be drop.
expect_one allow "$NS/other-same" "server-audit(pod)" "$AUDIT_IP" 8080 tcp
expect_one allow "$NS/other-cross" "server-audit(pod)" "$AUDIT_IP" 8080 tcp
run_plan
# Ingress drops happen at the server's veth, on the server's node.
flows_have "$N1" dropped "$NS/server" DROPPED default-deny "$NS/default-deny-ingress" "${IP[other-cross]}:"
flows_have "$N1" dropped "$NS/server" DROPPED default-deny "$NS/default-deny-ingress" "${IP[other-same]}:"
flows_have "$N1" audit "$NS/server-audit" AUDIT default-deny "${IP[other-cross]}:"
ready=$(kubectl -n "$NS" get pod server -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
if [[ $ready == True ]]; then
  pass "server still Ready under default deny (kubelet probes from the node allowed)"
else
  fail "server not Ready under default deny: kubelet probes are being dropped"
fi

# --- phase 2 ----------------------------------------------------------------
log "phase 2: allow app=client (same namespace) to app=server on TCP 8080 and UDP 8081"
apply_policy <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-to-server}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {matchLabels: {app: client}}
      ports:
        - {protocol: TCP, port: 8080}
        - {protocol: UDP, port: 8081}
EOF
expect "$NS/client-same" allow allow deny
expect "$NS/client-cross" allow allow deny
expect "$NS/other-same" deny deny deny
expect "$NS/other-cross" deny deny deny
expect "$NS_EXT/client-ext" deny deny deny
run_plan
flows_have "$N1" dropped "$NS/server" DROPPED default-deny "$NS/allow-client-to-server" "${IP[client-cross]}:" ":9090"
flows_have "$N1" dropped "$NS/server" DROPPED default-deny "$NS/allow-client-to-server" "${IP[client-ext]}:" ":8080"

# --- phase 3 ----------------------------------------------------------------
log "phase 3: allow app=client of namespace $NS_EXT on TCP 8080 (namespaceSelector AND podSelector)"
apply_policy <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ext-namespace}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: $NS_EXT}}
          podSelector: {matchLabels: {app: client}}
      ports:
        - {protocol: TCP, port: 8080}
EOF
expect "$NS_EXT/client-ext" allow deny deny
expect "$NS/other-cross" deny deny deny
expect "$NS/client-cross" allow allow deny
run_plan

# --- phase 4 ----------------------------------------------------------------
log "phase 4: egress of app=client limited to app=server TCP 8080"
apply_policy <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector: {matchLabels: {app: server}}
      ports:
        - {protocol: TCP, port: 8080}
EOF
expect "$NS/client-same" allow deny deny
expect "$NS/client-cross" allow deny deny
# The sender's perimeter is enforced even towards an audit-mode receiver.
expect_one deny "$NS/client-same" "server-audit(pod)" "$AUDIT_IP" 8080 tcp
# Not selected by the egress policy: unchanged.
expect "$NS_EXT/client-ext" allow deny deny
run_plan
# Egress drops to a pod IP happen at the sender's veth, on the sender's node.
flows_have "$N1" dropped "$NS/client-same" DROPPED default-deny egress "$NS/client-egress" "$SERVER_IP:8081"
flows_have "$N2" dropped "$NS/client-cross" DROPPED default-deny egress "$NS/client-egress" "$SERVER_IP:8081"

# --- phase 5 ----------------------------------------------------------------
log "phase 5: all policies deleted, everything connects again"
kubectl -n "$NS" delete networkpolicy --all >/dev/null
for c in client-same client-cross other-same other-cross; do expect "$NS/$c" allow allow allow; done
expect "$NS_EXT/client-ext" allow allow allow
run_plan

# --- result -----------------------------------------------------------------
echo
echo "netpol-smoke: $passes passed, $failures failed"
((failures == 0))
