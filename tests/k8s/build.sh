#!/usr/bin/env bash
# Builds the test cluster's control plane from the pinned Go modules beside this script:
# kube-apiserver, kube-controller-manager and kubectl (./kubernetes) and etcd (./etcd).
#
# Output: ${TRELLIS_K8S_CACHE:-$HOME/.cache/trellis-k8s}/<k8s-version>-<etcd-version>/bin/
# The last line on stdout is that folder; progress goes to stderr. `build.sh --dir` only
# prints the folder.
#
# Does nothing when all four binaries are there (a warm run takes well under a second).
# Concurrent callers (several test binaries at once) wait on one flock instead of
# building twice. Binaries are built into a temporary folder and renamed into place, so
# a reader never sees half a file. Go's module cache is kept (a rebuild after a version
# change downloads little); its build cache is not (see GOCACHE below).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

# The pinned versions, read from the go.mod files (no go command needed for a warm run).
module_version() { # <go.mod> <module path>
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' "$1"
}
k8s_version=$(module_version "$here/kubernetes/go.mod" k8s.io/kubernetes)
etcd_version=$(module_version "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [ -z "$k8s_version" ] || [ -z "$etcd_version" ]; then
  echo "build.sh: cannot read the pinned versions from $here/*/go.mod" >&2
  exit 1
fi

out="${TRELLIS_K8S_CACHE:-$HOME/.cache/trellis-k8s}/${k8s_version}-${etcd_version}"
bin="$out/bin"
if [ "${1:-}" = "--dir" ]; then
  echo "$bin"
  exit 0
fi

all_built() {
  local b
  for b in "${binaries[@]}"; do
    [ -x "$bin/$b" ] || return 1
  done
}

if all_built; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build.sh: the go command is not installed; cannot build the test cluster" >&2
  exit 127
fi

mkdir -p "$bin"
exec 9>"$out/.build.lock"
flock 9
# Another caller may have finished while this one waited for the lock.
if all_built; then
  echo "$bin"
  exit 0
fi

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

export CGO_ENABLED=0
# The finished binaries are the cache; Go's own build cache for this tree is several
# GB, so unless the caller chose one it lives in the scratch directory and goes with it.
export GOCACHE="${GOCACHE:-$tmp/gocache}"
# The wrapper modules live in the Trellis git repository; stamping them with its VCS
# state would only make the build depend on that state.
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"

# What `kubectl version` and the API server's /version report (the release build sets
# these the same way).
minor=${k8s_version#v1.}
minor=${minor%%.*}
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  version_flags+=" -X $pkg.gitTreeState=clean"
done

echo "build.sh: building Kubernetes $k8s_version and etcd $etcd_version into $bin" >&2
(
  cd "$here/kubernetes"
  go build -trimpath -ldflags="-s -w$version_flags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
)
(
  cd "$here/etcd"
  go build -trimpath -ldflags="-s -w" -o "$tmp/etcd" .
)

for b in "${binaries[@]}"; do
  mv -f "$tmp/$b" "$bin/$b"
done
echo "build.sh: built in $(($(date +%s) - start)) s" >&2
echo "$bin"
