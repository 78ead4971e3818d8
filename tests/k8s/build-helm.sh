#!/usr/bin/env bash
# Builds the helm command for the chart tests from the pinned Go module beside this
# script (./helm: `tool helm.sh/helm/v4/cmd/helm`), as build.sh builds the cluster.
#
# Output: ${TRELLIS_K8S_CACHE:-$HOME/.cache/trellis-k8s}/helm-<version>/bin/helm
# The last line on stdout is that folder; progress goes to stderr. `build-helm.sh --dir`
# only prints the folder.
#
# Does nothing when the binary is there. Concurrent callers wait on one flock; the
# binary is built into a temporary folder and renamed into place.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The pinned version, read from go.mod (no go command needed for a warm run).
helm_version=$(awk '$1 == "helm.sh/helm/v4" { print $2; exit }' "$here/helm/go.mod")
if [ -z "$helm_version" ]; then
  echo "build-helm.sh: cannot read the pinned helm version from $here/helm/go.mod" >&2
  exit 1
fi

out="${TRELLIS_K8S_CACHE:-$HOME/.cache/trellis-k8s}/helm-${helm_version}"
bin="$out/bin"
if [ "${1:-}" = "--dir" ]; then
  echo "$bin"
  exit 0
fi
if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build-helm.sh: the go command is not installed; cannot build helm" >&2
  exit 127
fi

mkdir -p "$bin"
exec 9>"$out/.build.lock"
flock 9
if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"

echo "build-helm.sh: building helm $helm_version into $bin" >&2
(
  cd "$here/helm"
  # What `helm version` reports (the release Makefile sets it the same way).
  go build -trimpath \
    -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    -o "$tmp/helm" helm.sh/helm/v4/cmd/helm
)
mv -f "$tmp/helm" "$bin/helm"
echo "build-helm.sh: built in $(($(date +%s) - start)) s" >&2
echo "$bin"
