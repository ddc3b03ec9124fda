#!/usr/bin/env bash
# Builds the real Kubernetes control plane for meshctl's tests (our "envtest"):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s/go.mod, k8s.io/kubernetes)
#   etcd                                                             (etcd/go.mod, go.etcd.io/etcd/server/v3)
#   kwok                                                             (kwok/go.mod, sigs.k8s.io/kwok)
# from the Go module proxy, into a cache directory keyed by the pinned versions:
#   ${MESHCTL_TESTENV_CACHE:-$HOME/.cache/meshctl/kube-testenv}/<k8s>-etcd<v>-kwok<v>/bin
# A complete directory (stamp file written last) is reused as is. Progress goes to stderr;
# the last line on stdout is the bin directory. See README.md next to this file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

die() {
    echo "kube-testenv/build.sh: error: $*" >&2
    exit 1
}
log() { echo "kube-testenv/build.sh: $*" >&2; }

# The versions are read from the go.mod files, the single source of truth.
modver() { # modver <go.mod> <module path>
    local v
    v="$(awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$1")"
    [[ -n "$v" ]] || die "cannot find the version of $2 in $1"
    echo "$v"
}
k8s_version="$(modver "$here/k8s/go.mod" k8s.io/kubernetes)"
etcd_version="$(modver "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"
kwok_version="$(modver "$here/kwok/go.mod" sigs.k8s.io/kwok)"

cache_root="${MESHCTL_TESTENV_CACHE:-${HOME:?HOME is not set}/.cache/meshctl/kube-testenv}"
key="${k8s_version}-etcd${etcd_version}-kwok${kwok_version}"
dest="$cache_root/$key"
bin="$dest/bin"
stamp="$dest/complete.stamp"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

complete() {
    [[ -f "$stamp" ]] || return 1
    local b
    for b in "${binaries[@]}"; do
        [[ -x "$bin/$b" ]] || return 1
    done
}

if complete; then
    log "reusing $bin"
    echo "$bin"
    exit 0
fi

command -v go >/dev/null 2>&1 || die "the Go toolchain ('go') is not on PATH (PATH=$PATH).
Install Go >= 1.26 (e.g. into /usr/local/go and add /usr/local/go/bin to PATH); it is required
to build kube-apiserver, etcd and kwok for the Kubernetes end-to-end tests."

mkdir -p "$dest"
# Only one build per key at a time (parallel test binaries may all call this script).
exec 9>"$dest/.lock"
if command -v flock >/dev/null 2>&1; then
    log "waiting for the build lock $dest/.lock"
    flock 9
fi
if complete; then
    log "reusing $bin (built by another process)"
    echo "$bin"
    exit 0
fi

go_version="$(go version)"
log "building $key with $go_version (takes several minutes the first time)"
start=$(date +%s)
tmp="$(mktemp -d "$dest/build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
rm -f "$stamp"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath"

# The same -X flags Kubernetes' own build sets, so /version and `kubectl version` report
# the real release (and clients see no version skew).
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
k8s_x=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_x+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    k8s_x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

(
    cd "$here/k8s"
    log "go build kube-apiserver kube-controller-manager kube-scheduler kubectl ($k8s_version)"
    go build -ldflags="-s -w$k8s_x" -o "$tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl
)
(
    cd "$here/etcd"
    log "go build etcd ($etcd_version)"
    go build -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
)
(
    cd "$here/kwok"
    log "go build kwok ($kwok_version)"
    go build -ldflags="-s -w" -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok
)

for b in "${binaries[@]}"; do
    [[ -x "$tmp/$b" ]] || die "go build did not produce $b"
done
rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
# The stamp is written last, atomically: its presence means the directory is complete.
printf 'k8s=%s etcd=%s kwok=%s\n%s\nbuilt %s in %ss\n' \
    "$k8s_version" "$etcd_version" "$kwok_version" "$go_version" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(($(date +%s) - start))" >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
log "built $key in $(($(date +%s) - start))s"
echo "$bin"
