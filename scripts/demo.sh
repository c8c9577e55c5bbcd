#!/usr/bin/env bash
# The local demo, with the real parts: moatd (local datastore) enforcing the policies in
# examples/demo/, pods created by moat-cni (standalone, moat-ipam), real traffic, and moatctl
# explaining it. Everything it creates is removed at the end, also on failure.
#
#   scripts/demo.sh [--check]      (BIN=target/release by default)
#
# --check turns every expectation into an assertion (make test runs it that way).
# shellcheck disable=SC2016,SC2034 # check conditions are strings evaluated later; they read TRACE, DROPS...
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
[[ ${1:-} == --check ]] && CHECK=1
BIN=${BIN:-target/release}
BIN=$(cd "$BIN" && pwd)
WORK=$(mktemp -d /tmp/moat-demo.XXXXXX)
PINS=/sys/fs/bpf/moat-demo-$$
SOCK=$WORK/moatd.sock
MOATCTL=("$BIN/moatctl" --socket "$SOCK" --pin-root "$PINS")
PODS=(shop/frontend shop/backend data/db data/reports)
FAILURES=0
MOATD_PID=

for b in moatd moatctl moat-cni moat-ipam; do
  [[ -x $BIN/$b ]] || { echo "demo: $BIN/$b missing; run make build" >&2; exit 1; }
done

netns_of() { echo "moatdemo-${1//\//-}"; }

# moatd's after-DNAT chain stays when moatd stops (a node keeps enforcing across restarts);
# the demo is not a node, so it takes the chain out as an uninstall would.
remove_after_dnat_rules() {
  local tool rule
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    "$tool" -w -t mangle -S 2>/dev/null | grep -e '-j MOAT-AFTER-DNAT' | sed 's/^-A /-D /' |
      while read -r rule; do eval "$tool -w -t mangle $rule"; done
    "$tool" -w -t mangle -F MOAT-AFTER-DNAT 2>/dev/null
    "$tool" -w -t mangle -X MOAT-AFTER-DNAT 2>/dev/null
  done
}

cleanup() {
  set +e
  # Servers first: a process left in a namespace keeps the namespace alive after `ip netns del`.
  for pod in "${PODS[@]}"; do
    cni DEL "$pod" >/dev/null 2>&1
    ip netns pids "$(netns_of "$pod")" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$(netns_of "$pod")" 2>/dev/null
  done
  ip netns pids moatdemo-legacy 2>/dev/null | xargs -r kill 2>/dev/null
  ip netns del moatdemo-legacy 2>/dev/null
  ip link del mdlegacy 2>/dev/null
  [[ -n $MOATD_PID ]] && kill "$MOATD_PID" 2>/dev/null && wait "$MOATD_PID" 2>/dev/null
  remove_after_dnat_rules
  rm -rf "$PINS" "$WORK"
}
trap cleanup EXIT

cat >"$WORK/net.json" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "moat-demo",
  "type": "moat-cni",
  "mode": "standalone",
  "socket": "$SOCK",
  "pinRoot": "$PINS",
  "pendingDir": "$WORK/pending",
  "ipam": {
    "type": "moat-ipam",
    "ranges": [[{"subnet": "10.199.0.0/24"}], [{"subnet": "fd99:199::/64"}]],
    "dataDir": "$WORK/ipam"
  }
}
EOF

# One CNI call, exactly as a runtime makes it.
cni() {
  local cmd=$1 pod=$2 ns=${2%/*} name=${2#*/}
  CNI_COMMAND=$cmd CNI_CONTAINERID="demo-${ns}-${name}" CNI_NETNS="/run/netns/$(netns_of "$pod")" \
    CNI_IFNAME=eth0 CNI_PATH="$BIN" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$ns;K8S_POD_NAME=$name" \
    "$BIN/moat-cni" <"$WORK/net.json"
}

step() { printf '\n== %s\n' "$*"; }

echo "Moat demo: policies from examples/demo/, binaries from $BIN"
mkdir -p "$WORK/policies" "$WORK/www"
cp examples/demo/*.yaml "$WORK/policies/"
echo ok >"$WORK/www/index.html"

step "1. moatd with the local datastore"
"$BIN/moatd" --policy-dir "$WORK/policies" --state-dir "$WORK/state" --socket "$SOCK" \
  --pending-dir "$WORK/pending" --pin-root "$PINS" --poll-ms 200 2>"$WORK/moatd.log" &
MOATD_PID=$!
for _ in $(seq 100); do "${MOATCTL[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
"${MOATCTL[@]}" status

step "2. pods created with moat-cni (standalone, moat-ipam, dual-stack)"
declare -A V4 V6
for pod in "${PODS[@]}"; do
  ip netns add "$(netns_of "$pod")"
  result=$(cni ADD "$pod")
  V4[$pod]=$(jq -r '.ips[] | select(.address | contains(".")) | .address | split("/")[0]' <<<"$result")
  V6[$pod]=$(jq -r '.ips[] | select(.address | contains(":")) | .address | split("/")[0]' <<<"$result")
  echo "  $pod  ${V4[$pod]}  ${V6[$pod]}"
done
# A legacy host outside the cluster's rules (TEST-NET-2; routed only to this namespace).
ip netns add moatdemo-legacy
ip link add mdlegacy type veth peer name eth0 netns moatdemo-legacy
ip link set mdlegacy up
ip -n moatdemo-legacy link set lo up
ip -n moatdemo-legacy link set eth0 up
ip -n moatdemo-legacy addr add 198.51.100.10/32 dev eth0
ip -n moatdemo-legacy route add 169.254.1.1 dev eth0 scope link
ip -n moatdemo-legacy route add default via 169.254.1.1 dev eth0
ip -n moatdemo-legacy neigh add 169.254.1.1 lladdr "$(cat /sys/class/net/mdlegacy/address)" dev eth0 nud permanent
ip route add 198.51.100.10/32 dev mdlegacy
LEGACY=198.51.100.10
echo "  legacy host  $LEGACY (not managed by Moat)"

# Services: a web server on 8080 everywhere, and "postgres" on 5432 in the db pod.
for pod in "${PODS[@]}"; do
  ip netns exec "$(netns_of "$pod")" busybox httpd -p 8080 -h "$WORK/www"
done
ip netns exec "$(netns_of data/db)" busybox httpd -p 5432 -h "$WORK/www"
ip netns exec moatdemo-legacy busybox httpd -p 8080 -h "$WORK/www"

step "3. policies: default deny, frontend->backend, backend->db, backend->legacy CIDR; db in audit mode"
ls "$WORK/policies"
"${MOATCTL[@]}" endpoint list

step "4. traffic"
probe() { # from_netns host port: a TCP handshake completes within 2 s
  ip netns exec "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null
}
expect() { # label want(allowed|denied) from_netns host port
  local got=denied
  probe "$3" "$4" "$5" && got=allowed
  local mark=ok
  if [[ $got != "$2" ]]; then mark="UNEXPECTED (wanted $2)"; FAILURES=$((FAILURES + 1)); fi
  printf '  %-46s %-8s %s\n' "$1" "$got" "$mark"
}
F=$(netns_of shop/frontend) B=$(netns_of shop/backend)
expect "frontend -> backend:8080 (v4)" allowed "$F" "${V4[shop/backend]}" 8080
expect "frontend -> backend:8080 (v6)" allowed "$F" "${V6[shop/backend]}" 8080
expect "frontend -> db:5432" denied "$F" "${V4[data/db]}" 5432
expect "backend -> db:5432" allowed "$B" "${V4[data/db]}" 5432
expect "backend -> legacy:8080 (egress CIDR)" allowed "$B" "$LEGACY" 8080
expect "frontend -> legacy:8080" denied "$F" "$LEGACY" 8080
expect "legacy -> backend:8080" denied moatdemo-legacy "${V4[shop/backend]}" 8080
expect "backend -> frontend:8080" denied "$B" "${V4[shop/frontend]}" 8080
expect "legacy -> db:5432 (db in audit: reported)" allowed moatdemo-legacy "${V4[data/db]}" 5432

step "5. why? moatctl trace"
"${MOATCTL[@]}" trace --from shop/frontend --to data/db --port 5432/TCP
"${MOATCTL[@]}" trace --from shop/frontend --to shop/backend --port 8080/TCP
TRACE=$("${MOATCTL[@]}" -o json trace --from shop/frontend --to data/db --port 5432/TCP)

step "6. moatctl flows: every drop with its reason and policy"
sleep 0.5
"${MOATCTL[@]}" flows --verdict dropped
"${MOATCTL[@]}" flows --verdict audit
DROPS=$("${MOATCTL[@]}" -o json flows --verdict dropped)
AUDITS=$("${MOATCTL[@]}" -o json flows --verdict audit)

step "7. threat detection: a port scan is seen in the kernel, the scanner quarantined and released"
# Everything above is ordinary traffic (a few denied probes included): it must raise nothing.
ORDINARY=$("${MOATCTL[@]}" -o json threats | jq length)
echo "  detections from the traffic above: $ORDINARY"
ip netns exec "$F" nmap -sS -Pn -n -T5 --max-retries 0 --max-rtt-timeout 100ms -p 1-60 "${V4[shop/backend]}" >/dev/null 2>&1 || true
SCANS=0
for _ in $(seq 50); do
  SCANS=$("${MOATCTL[@]}" -o json threats | jq '[.[] | select(.kind == "port-scan" and .source_pod == "shop/frontend")] | length')
  ((SCANS > 0)) && break
  sleep 0.1
done
"${MOATCTL[@]}" threats
"${MOATCTL[@]}" quarantine shop/frontend
expect "frontend -> backend:8080 (quarantined)" denied "$F" "${V4[shop/backend]}" 8080
"${MOATCTL[@]}" release shop/frontend
expect "frontend -> backend:8080 (released)" allowed "$F" "${V4[shop/backend]}" 8080

step "8. automatic promotion: data/reports walks learn -> audit -> enforce on its own (3 s windows)"
"${MOATCTL[@]}" promotion
stage_of() { "${MOATCTL[@]}" -o json promotion show data/reports | jq -r '.[0].stage'; }
wait_stage() { # stage: polls for up to 30 s
  for _ in $(seq 150); do [[ $(stage_of) == "$1" ]] && return 0; sleep 0.2; done
  return 1
}
D=$(netns_of data/db)
expect "db -> reports:8080 (learn: its one peer)" allowed "$D" "${V4[data/reports]}" 8080
wait_stage audit && echo "  reports: audit, under the proposed policy"
"${MOATCTL[@]}" promotion show data/reports
wait_stage enforce && echo "  reports: enforce"
PROMOTED=$(stage_of)
expect "db -> reports:8080 (enforce: learned)" allowed "$D" "${V4[data/reports]}" 8080
expect "legacy -> reports:8080 (enforce: never seen)" denied moatdemo-legacy "${V4[data/reports]}" 8080
"${MOATCTL[@]}" promotion

if ((CHECK)); then
  step "checks"
  check() { if eval "$2"; then echo "  ok: $1"; else echo "  FAILED: $1"; FAILURES=$((FAILURES + 1)); fi; }
  check "trace denies frontend->db by default deny of shop/default-deny" \
    '[[ $(jq -r .verdict <<<"$TRACE") == denied && $(jq -r .egress <<<"$TRACE") == *shop/default-deny* ]]'
  check "at least 5 drops journaled" '(( $(jq length <<<"$DROPS") >= 5 ))'
  check "every drop names its reason and rule" \
    '[[ $(jq "[.[] | select(.reason == \"\" or .rule == \"\")] | length" <<<"$DROPS") == 0 ]]'
  check "every default-deny drop names the policies that select the pod" \
    '[[ $(jq "[.[] | select(.reason == \"default-deny\" and (.rule | test(\"selected by [a-z]\") | not))] | length" <<<"$DROPS") == 0 ]]'
  check "the audit-mode db reported the would-be drop" '(( $(jq length <<<"$AUDITS") >= 1 ))'
  check "ordinary traffic raised no threat detection" '(( ORDINARY == 0 ))'
  check "the nmap scan from frontend was detected as a port scan" '(( SCANS >= 1 ))'
  check "data/reports was promoted to enforce on its own" '[[ $PROMOTED == enforce ]]'
fi

step "9. clean up"
for pod in "${PODS[@]}"; do cni DEL "$pod"; done
leftover=$("${MOATCTL[@]}" -o json endpoint list | jq length)
echo "  endpoints left after DEL: $leftover"
((leftover == 0)) || FAILURES=$((FAILURES + 1))

if ((FAILURES)); then
  echo "demo: $FAILURES unexpected results (moatd log: kept in output above)" >&2
  tail -20 "$WORK/moatd.log" >&2
  exit 1
fi
echo "demo: all outcomes as expected"
