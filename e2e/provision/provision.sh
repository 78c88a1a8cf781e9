#!/usr/bin/env bash
# Provision the local test world:
#   - Debian packages (the registry, openssl, kmod, the kernel's sign-file, …);
#   - from their published Go modules, with the machine's Go and pinned versions (the wrapper
#     modules beside this script, with committed go.mod/go.sum):
#       kube-apiserver, kube-controller-manager, kube-scheduler,
#       kubectl                                                   (k8s.io/kubernetes)
#       etcd                                                      (go.etcd.io/etcd/server/v3)
#       registration, work, placement, registration-operator     (open-cluster-management.io/ocm)
#       work-webhook: OCM's ManifestWork webhook package served on loopback (ocm/cmd/work-webhook)
#       governance-policy-propagator, config-policy-controller   (open-cluster-management.io/…)
#   - the MachineConfig and MachineConfigPool CRDs, copied from OpenShift's published API module
#     (github.com/openshift/api), and the ImageStream CRD, generated from that module's image/v1
#     types by controller-gen (sigs.k8s.io/controller-tools, built from its module);
# Idempotent: every step checks first and says what it does and how long it took. The
# binaries are cached outside the checkout, keyed by version: $CACHE/bin/<set>-<version>-<build>.
set -euo pipefail

K8S_VERSION="v1.37.2"
ETCD_VERSION="v3.7.4"
OCM_VERSION="v1.2.1"
GOVERNANCE_VERSION="v0.18.0"
OPENSHIFT_API_VERSION="v0.0.0-20251021124544-a2cb0c5d994d"
CONTROLLER_TOOLS_VERSION="v0.23.0"
# Bump when the way a set is built changes (flags, stamping): every machine then rebuilds.
BUILD_ID="kmm3"
GO_MIN="1.26"

CACHE="${KMM_FLEET_CACHE:-$HOME/.cache/kmm-fleet}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# One provisioning at a time per cache: the test binaries take this lock before they run the
# script (e2e/src/provision.rs, which then sets KMM_FLEET_PROVISION_LOCK_HELD), and a run by
# hand or from ./scripts/test takes it here, so two never build into the same *.tmp directory.
if [ -z "${KMM_FLEET_PROVISION_LOCK_HELD:-}" ] && command -v flock >/dev/null 2>&1; then
  mkdir -p "$CACHE"
  exec 9>"$CACHE/provision.lock"
  if ! flock -n 9; then
    printf '==> waiting for another provisioning of %s to finish\n' "$CACHE"
    flock 9
  fi
  export KMM_FLEET_PROVISION_LOCK_HELD=1
fi

PACKAGES=(docker-registry apache2-utils openssl kmod linux-headers-amd64 ca-certificates chromium
  time qemu-system-x86 ovmf busybox-static gcc make libc6-dev python3-venv)
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

# The Go programs. Each set: NAME VERSION MODULE-DIR LDFLAGS BIN=PACKAGE...
bin_dir() { printf '%s/bin/%s-%s-%s' "$CACHE" "$1" "$2" "$BUILD_ID"; }

need_go() {
  command -v go >/dev/null 2>&1 || fail "go is not on PATH (this machine kind ships Go $GO_MIN or newer)" \
    "install Go $GO_MIN or newer and put it on PATH"
  local v
  v=$(go env GOVERSION | sed 's/^go//')
  if [ "$(printf '%s\n%s\n' "$GO_MIN" "$v" | sort -V | head -n1)" != "$GO_MIN" ]; then
    fail "go $v is older than $GO_MIN" "install Go $GO_MIN or newer"
  fi
}

build_set() {
  local name=$1 version=$2 module=$3 ldflags=$4
  shift 4
  local dir
  dir=$(bin_dir "$name" "$version")
  local want=() pkgs=() b
  for b in "$@"; do
    want+=("${b%%=*}")
    pkgs+=("${b#*=}")
  done
  local all=1
  for b in "${want[@]}"; do [ -x "$dir/$b" ] || all=0; done
  if [ "$all" = 1 ]; then
    echo "==> $name $version cached in $dir (${want[*]})"
    return
  fi
  need_go
  mkdir -p "$dir"
  local tmp="$dir.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  local log="$CACHE/build-$name-$version.log"
  step "building $name $version from its Go module ($(go env GOVERSION), ${want[*]}; log $log)"
  local i timing=()
  [ -x /usr/bin/time ] && timing=(/usr/bin/time -f 'peak memory %M KiB, %e s wall, %U s user')
  for i in "${!want[@]}"; do
    printf '    %s\n' "${want[$i]}"
    ( cd "$HERE/$module" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 \
        "${timing[@]}" go build -trimpath -ldflags "$ldflags" -o "$tmp/${want[$i]}" "${pkgs[$i]}" ) \
        >>"$log" 2>&1 || fail "go build ${pkgs[$i]} (log: $log)" "cd $HERE/$module && go build ${pkgs[$i]}"
    [ ${#timing[@]} -gt 0 ] && printf '      %s\n' "$(tail -n1 "$log")"
  done
  for b in "${want[@]}"; do mv "$tmp/$b" "$dir/$b"; done
  rmdir "$tmp"
  done_step
}

K8S_MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
VERSION_PKG=k8s.io/component-base/version
build_set kube "$K8S_VERSION" kube "-s -w -X $VERSION_PKG.gitVersion=$K8S_VERSION \
 -X $VERSION_PKG.gitMajor=1 -X $VERSION_PKG.gitMinor=$K8S_MINOR -X $VERSION_PKG.gitTreeState=clean \
 -X $VERSION_PKG.buildDate=1970-01-01T00:00:00Z" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
  kubectl=k8s.io/kubernetes/cmd/kubectl

build_set etcd "$ETCD_VERSION" etcd "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
  etcd=go.etcd.io/etcd/server/v3

OCM_VPKG=open-cluster-management.io/ocm/pkg/version
build_set ocm "$OCM_VERSION" ocm "-s -w -X $OCM_VPKG.versionFromGit=$OCM_VERSION \
 -X $OCM_VPKG.majorFromGit=$(echo "$OCM_VERSION" | cut -d. -f1 | tr -d v) \
 -X $OCM_VPKG.minorFromGit=$(echo "$OCM_VERSION" | cut -d. -f2)" \
  registration=open-cluster-management.io/ocm/cmd/registration \
  work=open-cluster-management.io/ocm/cmd/work \
  placement=open-cluster-management.io/ocm/cmd/placement \
  registration-operator=open-cluster-management.io/ocm/cmd/registration-operator \
  work-webhook=./cmd/work-webhook

build_set governance "$GOVERNANCE_VERSION" governance \
  "-s -w -X open-cluster-management.io/governance-policy-propagator/version.Version=$GOVERNANCE_VERSION" \
  governance-policy-propagator=open-cluster-management.io/governance-policy-propagator \
  config-policy-controller=open-cluster-management.io/config-policy-controller

# The OCM and policy CRDs ship inside the modules; copy them next to the binaries so that the
# test world installs exactly the released files.
crd_dir="$(bin_dir ocm "$OCM_VERSION")/crds"
if [ ! -f "$crd_dir/.complete-2" ]; then
  step "collecting the OCM and policy CRDs from their modules"
  rm -rf "$crd_dir" && mkdir -p "$crd_dir/hub" "$crd_dir/spoke"
  modcache=$(go env GOMODCACHE)
  ocm_src="$modcache/open-cluster-management.io/ocm@$OCM_VERSION"
  prop_src="$modcache/open-cluster-management.io/governance-policy-propagator@$GOVERNANCE_VERSION"
  cpc_src="$modcache/open-cluster-management.io/config-policy-controller@$GOVERNANCE_VERSION"
  ( cd "$HERE/governance" && GOTOOLCHAIN=local go mod download open-cluster-management.io/governance-policy-propagator \
      open-cluster-management.io/config-policy-controller )
  ( cd "$HERE/ocm" && GOTOOLCHAIN=local go mod download open-cluster-management.io/ocm )
  cp "$ocm_src"/manifests/cluster-manager/hub/crds/*.crd.yaml "$crd_dir/hub/"
  # The add-on CRDs name the add-on manager's conversion webhook through operator templates;
  # the test world runs no add-on manager, so they keep their stored version only (strategy None).
  for f in "$crd_dir"/hub/*.yaml; do
    grep -q '{{' "$f" || continue
    awk '/^  conversion:/{skip=1; next} skip && /^  [a-z]/{skip=0} !skip' "$f" > "$f.tmp" && mv "$f.tmp" "$f"
    grep -q '{{' "$f" && fail "$f still holds template expressions"
  done
  cp "$ocm_src"/manifests/klusterlet/managed/*.crd.yaml "$crd_dir/spoke/"
  for f in "$prop_src"/deploy/crds/*.yaml; do cp "$f" "$crd_dir/hub/policy-$(basename "$f")"; done
  # Spokes hold replicated Policies too (the policy framework copies them into the cluster's
  # namespace there).
  cp "$prop_src"/deploy/crds/policy.open-cluster-management.io_policies.yaml "$crd_dir/spoke/policy-policies.yaml"
  for f in "$cpc_src"/deploy/crds/*.yaml; do
    case "$(basename "$f")" in kustomization.yaml) continue ;; esac
    cp "$f" "$crd_dir/spoke/policy-$(basename "$f")"
  done
  # The bootstrap ClusterRole of OCM's cluster-manager chart (its template lines removed).
  rbac_dir="$(bin_dir ocm "$OCM_VERSION")/rbac"
  mkdir -p "$rbac_dir"
  sed '/^{{/d' "$ocm_src/deploy/cluster-manager/chart/cluster-manager/templates/bootstrap_cluster_role.yaml" \
    > "$rbac_dir/bootstrap-clusterrole.yaml"
  chmod -R u+w "$crd_dir" "$rbac_dir"
  touch "$crd_dir/.complete-2"
  done_step
fi

# The MachineConfig and MachineConfigPool CRDs, exactly as OpenShift's API module ships them:
# the test world checks `kmm-hub machineconfig` output against them (e2e/tests/machineconfig.rs).
# This version ships one variant of each (no feature-gated -Default/-TechPreview files).
mc_dir="$CACHE/crds/openshift-api-$OPENSHIFT_API_VERSION"
if [ ! -f "$mc_dir/.complete-1" ]; then
  step "collecting the MachineConfig and MachineConfigPool CRDs from github.com/openshift/api $OPENSHIFT_API_VERSION into $mc_dir"
  need_go
  rm -rf "$mc_dir" && mkdir -p "$mc_dir"
  ( cd "$HERE/openshift-api" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go mod download github.com/openshift/api ) \
    || fail "go mod download github.com/openshift/api@$OPENSHIFT_API_VERSION" \
      "cd $HERE/openshift-api && go mod download github.com/openshift/api"
  os_src="$(go env GOMODCACHE)/github.com/openshift/api@$OPENSHIFT_API_VERSION/machineconfiguration/v1/zz_generated.crd-manifests"
  for f in 0000_80_machine-config_01_machineconfigs.crd.yaml 0000_80_machine-config_01_machineconfigpools.crd.yaml; do
    [ -f "$os_src/$f" ] || fail "$f missing from github.com/openshift/api@$OPENSHIFT_API_VERSION ($os_src)"
    cp "$os_src/$f" "$mc_dir/$f"
  done
  chmod -R u+w "$mc_dir"
  touch "$mc_dir/.complete-1"
  done_step
else
  echo "==> MachineConfig and MachineConfigPool CRDs (openshift/api $OPENSHIFT_API_VERSION) in $mc_dir"
fi

# The ImageStream CRD. OpenShift serves ImageStreams from its own API server, so its API module
# ships no CRD of them: controller-gen (pinned beside the API module in openshift-api/go.mod)
# generates one from the module's image/v1 Go types, for spokes that play OpenShift (the spoke
# agent's Driver Toolkit claim, e2e/tests/spoke/dtk.rs). Only the ImageStream file is kept.
build_set controller-tools "$CONTROLLER_TOOLS_VERSION" openshift-api "-s -w" \
  controller-gen=sigs.k8s.io/controller-tools/cmd/controller-gen
is_dir="$CACHE/crds/openshift-api-$OPENSHIFT_API_VERSION-image-$CONTROLLER_TOOLS_VERSION"
is_crd=image.openshift.io_imagestreams.yaml
if [ ! -f "$is_dir/.complete-1" ]; then
  step "generating the ImageStream CRD from github.com/openshift/api $OPENSHIFT_API_VERSION (image/v1) with controller-gen $CONTROLLER_TOOLS_VERSION into $is_dir"
  need_go
  rm -rf "$is_dir" "$is_dir.tmp" && mkdir -p "$is_dir.tmp"
  ( cd "$HERE/openshift-api" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
      "$(bin_dir controller-tools "$CONTROLLER_TOOLS_VERSION")/controller-gen" crd \
      paths=github.com/openshift/api/image/v1 output:crd:dir="$is_dir.tmp" ) \
    || fail "controller-gen crd paths=github.com/openshift/api/image/v1" \
      "cd $HERE/openshift-api && controller-gen crd paths=github.com/openshift/api/image/v1 output:crd:dir=/tmp/crds"
  [ -f "$is_dir.tmp/$is_crd" ] || fail "controller-gen wrote no $is_crd"
  mkdir -p "$is_dir" && mv "$is_dir.tmp/$is_crd" "$is_dir/$is_crd" && rm -rf "$is_dir.tmp"
  touch "$is_dir/.complete-1"
  done_step
else
  echo "==> ImageStream CRD (openshift/api $OPENSHIFT_API_VERSION, controller-gen $CONTROLLER_TOOLS_VERSION) in $is_dir"
fi

# Real-kernel nodes (e2e/src/vm.rs): Debian's packaged kernel, the same version as the
# linux-headers-amd64 that modules are compiled against, with Debian's signed shim and GRUB
# for the Secure Boot node. Unpacked (not installed: this machine's own boot stays untouched)
# into $CACHE/vm/<kernel>/root, with depmod's indexes.
KVER=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | sed -n 's/.*linux-headers-\([0-9][^ ,]*-amd64\).*/\1/p')
[ -n "$KVER" ] || fail "cannot tell the kernel version of linux-headers-amd64" "dpkg -s linux-headers-amd64"
# The kernel's scripts/sign-file (from linux-kbuild-<major.minor>, a dependency of the headers):
# hub/tests/sign_file.rs compares our signatures with it and fails without it.
SIGN_FILE="/usr/lib/linux-kbuild-$(printf '%s' "$KVER" | cut -d. -f1,2)/scripts/sign-file"
[ -x "$SIGN_FILE" ] || fail "the kernel's sign-file is missing ($SIGN_FILE)" \
  "apt-get install --reinstall linux-headers-$KVER linux-kbuild-$(printf '%s' "$KVER" | cut -d. -f1,2)"
echo "==> the kernel's sign-file: $SIGN_FILE"
vm_dir="$CACHE/vm/$KVER"
if [ ! -f "$vm_dir/.complete-1" ]; then
  step "unpacking Debian's kernel $KVER, shim and GRUB for the real-kernel nodes into $vm_dir"
  rm -rf "$vm_dir" && mkdir -p "$vm_dir/debs" "$vm_dir/root"
  ( cd "$vm_dir/debs" && apt-get download -q "linux-image-$KVER" shim-signed shim-helpers-amd64-signed \
      grub-efi-amd64-signed 2>&1 | grep -v '^W: Download is performed unsandboxed' ) \
    || fail "apt-get download linux-image-$KVER shim-signed grub-efi-amd64-signed"
  for d in "$vm_dir"/debs/*.deb; do dpkg-deb -x "$d" "$vm_dir/root"; done
  depmod -b "$vm_dir/root" "$KVER" || fail "depmod -b $vm_dir/root $KVER"
  rm -rf "$vm_dir/debs"
  touch "$vm_dir/.complete-1"
  done_step
else
  echo "==> kernel $KVER for the real-kernel nodes unpacked in $vm_dir"
fi
# virt-fw-vars (PyPI virt-firmware) enrolls the sandbox's certificate in the Secure Boot VM's
# MOK list, in a copy of OVMF's variable store.
VIRT_FIRMWARE_VERSION="26.10"
venv="$CACHE/venv/virt-firmware-$VIRT_FIRMWARE_VERSION"
if [ ! -x "$venv/bin/virt-fw-vars" ]; then
  step "installing virt-firmware $VIRT_FIRMWARE_VERSION (PyPI) into $venv"
  rm -rf "$venv" && /usr/bin/python3 -m venv "$venv" || fail "python3 -m venv $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "virt-firmware==$VIRT_FIRMWARE_VERSION" \
    || fail "pip install virt-firmware==$VIRT_FIRMWARE_VERSION"
  done_step
else
  echo "==> virt-firmware $VIRT_FIRMWARE_VERSION in $venv"
fi
echo "==> test world programs ready in $CACHE/bin"
