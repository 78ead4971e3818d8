#!/usr/bin/env bash
# End-to-end test of Trellis on a kind cluster: builds the images, installs
# Trellis (deploy/), labels namespace demo, and checks mTLS identities, a DENY
# policy, a retry policy hiding a failing pod, and Jobs completing with the native
# sidecar. Deletes the cluster on exit (KEEP_CLUSTER=1 keeps it).
#
#   tests/kind/run.sh        # from anywhere; needs docker (a running daemon), kind, kubectl
set -euo pipefail

CLUSTER="${CLUSTER:-trellis-e2e}"
TAG=e2e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MANIFESTS="$ROOT/tests/kind/manifests"
NS=demo

log() { printf '\n=== %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

if ! command -v docker >/dev/null 2>&1 || ! command -v kind >/dev/null 2>&1 \
   || ! command -v kubectl >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "SKIPPED: needs docker (with a running daemon), kind and kubectl"
  exit 0
fi

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "--- diagnostics (exit $rc)"
    kubectl get pods -A -o wide || true
    kubectl -n trellis-system logs deploy/trellis-control --tail=100 || true
    kubectl -n "$NS" get events --sort-by=.lastTimestamp | tail -30 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

log "building images"
cd "$ROOT"
export DOCKER_BUILDKIT=1
docker build -f deploy/docker/Dockerfile.control -t "trellis-control:$TAG" .
# The sidecar (distroless) and the iptables init container (with iptables).
docker build -f deploy/docker/Dockerfile.proxy -t "trellis-proxy:$TAG" .
docker build -f deploy/docker/Dockerfile.init -t "trellis-proxy-init:$TAG" .
docker build -f deploy/docker/Dockerfile.testapp -t "trellis-testapp:$TAG" .

log "creating kind cluster $CLUSTER"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster --name "$CLUSTER" --wait 120s
for image in trellis-control trellis-proxy trellis-proxy-init trellis-testapp; do
  kind load docker-image --name "$CLUSTER" "$image:$TAG"
done

log "installing Trellis"
# The same manifests as `kubectl apply -k deploy/kustomize`, with the local images.
cargo run --quiet -p trellisctl -- install \
    --control-image "trellis-control:$TAG" --proxy-image "trellis-proxy:$TAG" \
    --init-image "trellis-proxy-init:$TAG" \
  | sed 's/imagePullPolicy: IfNotPresent/imagePullPolicy: Never/' \
  | kubectl apply --server-side -f -
kubectl wait --for=condition=Established --timeout=60s \
  crd/trafficpolicies.trellis.io crd/authorizationpolicies.trellis.io crd/peerauthentications.trellis.io
# Both replicas: they share the CA root through the Secret trellis-ca-root.
kubectl -n trellis-system rollout status deploy/trellis-control --timeout=180s

log "waiting for the control plane to fill the webhook's caBundle"
for _ in $(seq 60); do
  bundle="$(kubectl get mutatingwebhookconfiguration trellis-injector \
    -o jsonpath='{.webhooks[0].clientConfig.caBundle}')"
  [[ -n "$bundle" ]] && break
  sleep 2
done
[[ -n "$bundle" ]] || fail "caBundle never set on trellis-injector"
root="$(kubectl -n trellis-system get secret trellis-ca-root -o jsonpath='{.data.tls\.crt}')"
[[ "$bundle" == "$root" ]] || fail "the webhook's caBundle is not the shared root in trellis-ca-root"
holder="$(kubectl -n trellis-system get lease trellis-control -o jsonpath='{.spec.holderIdentity}')"
[[ -n "$holder" ]] || fail "no control-plane replica holds the Lease trellis-control"
log "leader: $holder"

log "namespace $NS, injection enabled"
kubectl create namespace "$NS"
kubectl label namespace "$NS" trellis.io/inject=enabled
kubectl apply -f "$MANIFESTS/00-apps.yaml"
kubectl -n "$NS" rollout status deploy/echo-good --timeout=180s
pod="$(kubectl -n "$NS" get pod -l app=echo,version=good -o jsonpath='{.items[0].metadata.name}')"
sidecar="$(kubectl -n "$NS" get pod "$pod" \
  -o jsonpath='{.spec.initContainers[?(@.name=="trellis-proxy")].restartPolicy}')"
[[ "$sidecar" == Always ]] || fail "echo-good has no native sidecar (trellis-proxy, restartPolicy Always)"

# run_job NAME COUNT: runs the client Job, prints its log, returns 0 if it
# completed, 1 if it failed.
run_job() {
  local name=$1 count=$2
  sed -e "s/NAME/$name/" -e "s/COUNT/$count/" "$MANIFESTS/client-job.yaml" | kubectl apply -f -
  for _ in $(seq 90); do
    local succeeded failed
    succeeded="$(kubectl -n "$NS" get job "$name" -o jsonpath='{.status.succeeded}')"
    failed="$(kubectl -n "$NS" get job "$name" -o jsonpath='{.status.failed}')"
    if [[ "${succeeded:-0}" -ge 1 ]]; then
      kubectl -n "$NS" logs "job/$name" -c client
      return 0
    fi
    if [[ "${failed:-0}" -ge 1 ]]; then
      kubectl -n "$NS" logs "job/$name" -c client || true
      return 1
    fi
    sleep 2
  done
  fail "job $name neither completed nor failed in 180s (is the sidecar keeping it alive?)"
}

log "client -> echo over mTLS; the Job completes"
out="$(run_job call-1 5)" || fail "client could not call echo: $out"
grep -q "echo-good GET /hello" <<<"$out" || fail "unexpected answer: $out"
metrics="$(kubectl get --raw "/api/v1/namespaces/$NS/pods/$pod:15020/proxy/metrics")"
grep -E 'trellis_inbound_connections_total\{[^}]*peer_identity="spiffe://cluster.local/ns/demo/sa/client"' \
  <<<"$metrics" || fail "echo's proxy did not see the client's SPIFFE ID: $(grep inbound <<<"$metrics")"

log "a DENY AuthorizationPolicy refuses the client"
kubectl apply -f "$MANIFESTS/20-deny-client.yaml"
denied=""
for i in $(seq 15); do
  if out="$(run_job "deny-$i" 1)"; then
    sleep 2
  else
    grep -q "HTTP 403" <<<"$out" && denied=yes && break
    sleep 2
  fi
done
[[ -n "$denied" ]] || fail "the client was never refused with 403: $out"
accepted="$(kubectl -n "$NS" get authorizationpolicy deny-client \
  -o jsonpath='{.status.conditions[?(@.type=="Accepted")].status}')"
[[ "$accepted" == True ]] || fail "deny-client is not Accepted: $accepted"
kubectl delete -f "$MANIFESTS/20-deny-client.yaml"
sleep 5

log "a TrafficPolicy with retries hides a failing pod"
kubectl apply -f "$MANIFESTS/30-retries.yaml"
kubectl apply -f "$MANIFESTS/10-echo-bad.yaml"
kubectl -n "$NS" rollout status deploy/echo-bad --timeout=180s
sleep 5
out="$(run_job retries 40)" || fail "requests failed despite retries: $out"
[[ "$(grep -c '^HTTP 200' <<<"$out")" -eq 40 ]] || fail "not all 40 answered 200: $out"

log "PASS"
