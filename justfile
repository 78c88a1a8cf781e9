# kmm-fleet everyday commands. `just` lists them.

default:
    @{{just_executable()}} --list

# Format all code.
fmt:
    cargo fmt --all

# Lints as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The whole suite, as CI runs it (provisions the test world first).
test *ARGS:
    ./scripts/test {{ARGS}}

# Unit tests only (no cluster needed).
unit:
    cargo nextest run --workspace --lib --bins

# Regenerate what is generated: the CRDs in manifests/crds from the types, and the spoke
# Policy in manifests/policy/policy.yaml from manifests/spoke.
generate:
    cargo run -q -p kmm-hub -- crd --dir manifests/crds --reference docs/crd-reference.md
    cargo run -q -p kmm-e2e --bin kmm-fleet -- generate-policy

# Fail when the committed CRDs or Policy differ from the generators' output.
check-generated:
    cargo test -q -p shared-api --test generated
    cargo nextest run -p kmm-e2e --test install policy_yaml

# Validate Module / ManagedClusterModule YAML offline.
validate +FILES:
    cargo run -q -p kmm-hub -- validate {{FILES}}

# Print an OpenShift MachineConfig: Day-1 loading (--image, --module) or the firmware path (docs/day0-day1.md).
machineconfig +ARGS:
    cargo run -q -p kmm-hub -- machineconfig {{ARGS}}

# Provision the test world (Debian packages; Kubernetes, etcd, OCM and the policy framework built from their Go modules; OpenShift's MachineConfig CRDs).
provision:
    bash e2e/provision/provision.sh

# Bring a local fleet up (hub + N spokes) and keep it running.
fleet-up spokes="2" nodes="3" dir="/tmp/kmm-fleet":
    cargo run -q -p kmm-e2e --bin kmm-fleet -- up --spokes {{spokes}} --nodes {{nodes}} --dir {{dir}}

# Stop a fleet started with fleet-up.
fleet-down dir="/tmp/kmm-fleet":
    cargo run -q -p kmm-e2e --bin kmm-fleet -- down --dir {{dir}}

# Build the hub and spoke images with buildah (daemonless, vfs storage). Names and tags come
# from manifests/images/kustomization.yaml; needs network access for the base images.
images:
    #!/usr/bin/env bash
    set -euo pipefail
    ref() { awk -v n="$1" '$2 == "name:" { f = ($3 == n) } f && $1 == "newName:" { r = $2 } f && $1 == "newTag:" { print r ":" $2; exit }' manifests/images/kustomization.yaml; }
    for c in hub spoke; do
      image=$(ref "kmm-$c")
      test -n "$image" || { echo "no image for kmm-$c in manifests/images/kustomization.yaml" >&2; exit 1; }
      buildah build --storage-driver vfs --isolation chroot --layers \
        --build-arg VERSION="${image##*:}" -f "containers/$c.Containerfile" -t "$image" .
      echo "built $image"
    done

# The signing bench, then the fleet bench on the test world (fan-out over 100/1,000/10,000
# clusters, steady state, hub and spoke memory). TARGET is $CARGO_TARGET_DIR or target; ARGS go
# to the fleet bench (e.g. `--sizes 100,1000`). Run nothing else heavy meanwhile.
# Benchmarks: writes TARGET/bench/results.json, docs/benchmarks.md and its plot.
bench *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    t0=$(date +%s)
    KMM_FLEET_EXTRA_PACKAGES="${KMM_FLEET_EXTRA_PACKAGES:-} fonts-dejavu-core" bash e2e/provision/provision.sh
    # Absolute: the fleet bench runs in e2e/, where a relative path would not resolve.
    out="$(realpath -m "${CARGO_TARGET_DIR:-target}")/bench"
    mkdir -p "$out"
    echo "==> kmm-hub and kmm-spoke as the container images build them (release-small, one each)"
    cargo build --profile release-small --locked -p kmm-spoke --bin kmm-spoke
    cargo build --profile release-small --locked -p kmm-hub --bin kmm-hub
    echo "==> signing: native vs sign-file"
    cargo bench --locked -p kmm-hub --bench sign | tee "$out/sign.jsonl"
    echo "==> fleet: fan-out, steady state, memory"
    cargo bench --locked -p kmm-e2e --bench fleet -- --sign-results "$out/sign.jsonl" {{ARGS}}
    echo "==> bench done in $(( $(date +%s) - t0 ))s: $out/results.json, docs/benchmarks.md"
