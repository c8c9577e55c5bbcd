#!/usr/bin/env bash
# Churn smoke test against a cluster with Moat installed (kind-tests/run.sh runs it): pods
# created and deleted in bulk, over several rounds, with a NetworkPolicy selecting them, then
#   - every moatd is still Ready and was not restarted;
#   - no endpoint of the churned pods is left behind in any moatd (moatctl endpoint list);
#   - a fresh client still reaches a fresh server, and a denied peer is still denied.
#
#   KUBECONFIG=... kind-tests/churn-smoke.sh
#
# Environment (defaults): NS=moat-churn, REPLICAS=30, ROUNDS=3, TIMEOUT=300s, KEEP=0,
# AGNHOST_IMAGE=registry.k8s.io/e2e-test-images/agnhost:2.53
set -euo pipefail

NS=${NS:-moat-churn}
REPLICAS=${REPLICAS:-30}
ROUNDS=${ROUNDS:-3}
TIMEOUT=${TIMEOUT:-300s}
KEEP=${KEEP:-0}
AGNHOST_IMAGE=${AGNHOST_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.53}

info() { printf '    %s\n' "$*"; }
die() { printf 'churn-smoke: FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [[ $KEEP != 1 || $rc == 0 ]]; then
    kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  else
    echo "churn-smoke: namespace $NS kept for inspection" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

moat_pods() {
  kubectl -n kube-system get pods -l app.kubernetes.io/name=moat -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}
restarts() {
  kubectl -n kube-system get pods -l app.kubernetes.io/name=moat \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort
}

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
before=$(restarts)
info "moatd restart counts before: $(tr '\n' ' ' <<<"$before")"

kubectl apply -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: churn, namespace: $NS}
spec:
  replicas: 0
  selector: {matchLabels: {app: churn}}
  template:
    metadata: {labels: {app: churn}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
        - name: pause
          image: $AGNHOST_IMAGE
          args: [pause]
          resources: {requests: {cpu: 1m, memory: 8Mi}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: churn-ingress, namespace: $NS}
spec:
  podSelector: {matchLabels: {app: churn}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
YAML

for round in $(seq 1 "$ROUNDS"); do
  kubectl -n "$NS" scale deploy/churn --replicas="$REPLICAS" >/dev/null
  kubectl -n "$NS" rollout status deploy/churn --timeout="$TIMEOUT" >/dev/null ||
    die "round $round: $REPLICAS pods not Ready within $TIMEOUT"
  kubectl -n "$NS" scale deploy/churn --replicas=0 >/dev/null
  kubectl -n "$NS" wait --for=delete pod -l app=churn --timeout="$TIMEOUT" >/dev/null 2>&1 || true
  info "round $round: $REPLICAS pods up and down"
done
[[ -z $(kubectl -n "$NS" get pods -l app=churn -o name) ]] || die "churned pods still exist"

# Every moatd Ready, none restarted.
kubectl -n kube-system rollout status ds/moat --timeout=60s >/dev/null || die "moat DaemonSet not Ready after the churn"
after=$(restarts)
[[ $after == "$before" ]] || die "moatd restarted during the churn: before [$before] after [$after]"
info "moatd: all Ready, no restart"

# No endpoint of the churned pods left in any moatd (DELs may take a moment to drain).
for pod in $(moat_pods); do
  deadline=$((SECONDS + 60))
  while :; do
    left=$(kubectl -n kube-system exec "$pod" -c moatd -- moatctl -o json endpoint list |
      grep -o "\"pod_namespace\": *\"$NS\"" | wc -l)
    ((left == 0)) && break
    ((SECONDS < deadline)) || die "$pod: $left endpoint(s) of $NS left after the churn"
    sleep 2
  done
done
info "no leftover endpoints"

# Policy still enforced on new pods: client allowed, other denied.
kubectl -n "$NS" run server --image="$AGNHOST_IMAGE" --labels=app=churn --restart=Never \
  -- serve-hostname --tcp --http=false --port 8080 >/dev/null
kubectl -n "$NS" run client --image="$AGNHOST_IMAGE" --labels=role=client --restart=Never -- pause >/dev/null
kubectl -n "$NS" run other --image="$AGNHOST_IMAGE" --labels=role=other --restart=Never -- pause >/dev/null
kubectl -n "$NS" wait --for=condition=Ready pod/server pod/client pod/other --timeout="$TIMEOUT" >/dev/null
ip=$(kubectl -n "$NS" get pod server -o jsonpath='{.status.podIP}')
connect() { kubectl -n "$NS" exec "$1" -- /agnhost connect "$ip:8080" --timeout=2s --protocol=tcp 2>&1; }
ok=0
for _ in $(seq 1 15); do
  if connect client >/dev/null; then ok=1; break; fi
  sleep 2
done
((ok)) || die "client cannot reach the server after the churn"
if out=$(connect other); then
  die "a peer the policy does not allow reached the server"
fi
grep -q TIMEOUT <<<"$out" || die "the denied probe failed for another reason: $out"
info "policy: client allowed, other denied (timeout)"
echo "churn-smoke: PASS ($ROUNDS rounds of $REPLICAS pods)"
