#!/usr/bin/env bash
# Provision the local test world: Debian packages, then kube-apiserver and
# kube-controller-manager v1.20.2 built from Debian's `kubernetes` source package.
# Idempotent: every step checks first and says what it does and how long it took.
# The binaries are cached outside the checkout, keyed by the source version.
set -euo pipefail

K8S_SRC_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_GIT_VERSION="v1.20.2"
# Bump the suffix whenever the patches below change: binaries are cached per build id.
K8S_BUILD_ID="$K8S_GIT_VERSION-kmm1"
CACHE="${KMM_FLEET_CACHE:-$HOME/.cache/kmm-fleet}"
BIN_DIR="$CACHE/k8s-$K8S_BUILD_ID"
WORK="$CACHE/build-k8s-$K8S_GIT_VERSION"

PACKAGES=(golang-1.19-go etcd-server rsync dpkg-dev golang-github-modern-go-reflect2-dev
  docker-registry apache2-utils openssl kmod linux-headers-amd64 ca-certificates chromium)
[ -n "${KMM_FLEET_EXTRA_PACKAGES:-}" ] && read -r -a extra <<<"$KMM_FLEET_EXTRA_PACKAGES" && PACKAGES+=("${extra[@]}")

step_start=0
step() { step_start=$(date +%s); printf '==> %s\n' "$*"; }
done_step() { printf '    done in %ss\n' "$(( $(date +%s) - step_start ))"; }
fail() {
  printf 'provision: FAILED: %s\n' "$1" >&2
  [ -n "${2:-}" ] && printf 'provision: to do it by hand: %s\n' "$2" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else fail "need root to run: $*" "sudo $*"; fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq || fail "apt-get update" "apt-get update"
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]}" "apt-get install -y ${missing[*]}"
  done_step
else
  echo "==> Debian packages present (${#PACKAGES[@]})"
fi

if [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kube-controller-manager" ]; then
  echo "==> kube-apiserver and kube-controller-manager $K8S_BUILD_ID cached in $BIN_DIR"
  exit 0
fi

mkdir -p "$WORK" "$BIN_DIR"
# A private deb-src list derived from the machine's own Debian source configuration:
# /etc/apt stays untouched and no host name is written into the repository.
APT_DIR="$WORK/apt"
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/sources.list.d"
src_conf=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  src_conf+="$(sed -e 's/^Types:.*/Types: deb-src/' "$f")"$'\n\n'
done
if [ -z "$src_conf" ] && [ -f /etc/apt/sources.list ]; then
  grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$APT_DIR/sources.list" || true
else
  printf '%s' "$src_conf" > "$APT_DIR/sources.list.d/debian-src.sources"
  : > "$APT_DIR/sources.list"
fi
APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
  -o "Dir::State::Lists=$APT_DIR/lists" -o "APT::Sandbox::User=root")

DSC="$WORK/kubernetes_${K8S_SRC_VERSION//+really/+really}.dsc"
if ! ls "$WORK"/kubernetes_*.dsc >/dev/null 2>&1; then
  step "fetching Debian source package kubernetes=$K8S_SRC_VERSION"
  apt-get "${APT_OPTS[@]}" update -qq || fail "apt-get update for the deb-src list in $APT_DIR" \
    "apt-get ${APT_OPTS[*]} update"
  (cd "$WORK" && apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=$K8S_SRC_VERSION" >/dev/null) \
    || fail "apt-get source kubernetes=$K8S_SRC_VERSION" "cd $WORK && apt-get ${APT_OPTS[*]} source --download-only kubernetes=$K8S_SRC_VERSION"
  done_step
fi
DSC=$(ls "$WORK"/kubernetes_*.dsc | head -n1)

GOPATH_DIR="$WORK/gopath"
TREE="$WORK/src"
if [ ! -f "$TREE/.unpacked" ]; then
  step "unpacking $DSC"
  rm -rf "$TREE"
  dpkg-source --no-check -x "$DSC" "$TREE" >/dev/null || fail "dpkg-source -x $DSC" "dpkg-source -x $DSC $TREE"
  # The vendored reflect2 v1.0.1 crashes under Go >= 1.18; Debian's 1.0.2 fixes it.
  R2=/usr/share/gocode/src/github.com/modern-go/reflect2
  rm -f "$TREE/vendor/github.com/modern-go/reflect2/"*.go "$TREE/vendor/github.com/modern-go/reflect2/"*.s
  cp "$R2"/*.go "$TREE/vendor/github.com/modern-go/reflect2/"
  ls "$R2"/*.s >/dev/null 2>&1 && cp "$R2"/*.s "$TREE/vendor/github.com/modern-go/reflect2/"
  rm -f "$TREE/vendor/github.com/modern-go/reflect2/"*_test.go
  touch "$TREE/.unpacked"
  done_step
fi

# Go >= 1.18's reflect.Zero returns the runtime's shared zero buffer, the same one an empty
# string is boxed to; go-openapi's type validator then takes every "" for null and rejects
# it ("must be of type string: \"null\"") in CRD defaults and in custom resources. Built
# with its own Go 1.15 the check was effectively `data == nil`; restore exactly that.
if [ ! -f "$TREE/.patched-zero-null" ]; then
  step "patching go-openapi's zero-value check (empty strings taken for null under Go >= 1.18)"
  for f in "$TREE/vendor/github.com/go-openapi/validate/type.go" \
           "$TREE/vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go"; do
    [ -f "$f" ] || continue
    sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$f"
    grep -q 'reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data))' "$f" && fail "patching $f" "edit $f by hand"
  done
  touch "$TREE/.patched-zero-null"
  done_step
fi

mkdir -p "$GOPATH_DIR/src/k8s.io"
ln -sfn "$TREE" "$GOPATH_DIR/src/k8s.io/kubernetes"
export PATH="/usr/lib/go-1.19/bin:$PATH" GOPATH="$GOPATH_DIR" GO111MODULE=off CGO_ENABLED=0 GOPROXY=off \
  GOFLAGS= GOCACHE="$WORK/gocache"
cd "$GOPATH_DIR/src/k8s.io/kubernetes"

if [ ! -f pkg/generated/openapi/zz_generated.openapi.go ]; then
  step "generating OpenAPI definitions (make gen_openapi)"
  make gen_openapi >"$WORK/gen_openapi.log" 2>&1 || fail "make gen_openapi (log: $WORK/gen_openapi.log)" \
    "cd $GOPATH_DIR/src/k8s.io/kubernetes && GO111MODULE=off GOPATH=$GOPATH_DIR make gen_openapi"
  done_step
fi

LDFLAGS="-s -w -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=$K8S_GIT_VERSION \
 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20 \
 -X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitTreeState=clean"
for bin in kube-apiserver kube-controller-manager; do
  if [ ! -x "$BIN_DIR/$bin" ]; then
    step "building $bin $K8S_BUILD_ID (Go 1.19, 2 jobs; a cold build takes a few minutes)"
    go build -p 2 -ldflags "$LDFLAGS" -o "$BIN_DIR/$bin.tmp" "./cmd/$bin" >"$WORK/$bin.log" 2>&1 \
      || fail "go build ./cmd/$bin (log: $WORK/$bin.log)" "see $WORK/$bin.log"
    mv "$BIN_DIR/$bin.tmp" "$BIN_DIR/$bin"
    done_step
  fi
done
# The build cache is large and only needed to rebuild; the binaries are what we keep.
rm -rf "$WORK/gocache"
echo "==> kube-apiserver and kube-controller-manager $K8S_BUILD_ID ready in $BIN_DIR"
