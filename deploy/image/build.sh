#!/usr/bin/env bash
# Build the digits container images with podman or docker, wherever either one works.
#
#   deploy/image/build.sh build                     # CPU server (the Dockerfile's `runtime`): localhost/digits:1.0.0
#   deploy/image/build.sh build --target train      # training job: localhost/digits-train:1.0.0
#   deploy/image/build.sh build --tag my/digits:dev # any tag
#   deploy/image/build.sh base                      # only make (or reuse) the Python base image
#   deploy/image/build.sh engine                    # print how this machine runs containers (see below)
#
# `make image` runs the first (IMAGE_TARGET=train for the second).
#
# The base. The Dockerfile builds FROM ${PYTHON_IMAGE} (python:3.11-slim-bookworm by default, from Docker Hub).
# Where Docker Hub is out of reach, this script makes an equivalent base itself: Debian bookworm's python3
# (3.11) from the Debian archive with debootstrap, imported as localhost/digits-python:bookworm-2. The
# engine keeps it, so it is made once per machine (about 40 s) and reused by every later build. Set
# PYTHON_IMAGE to build on another base instead, e.g. PYTHON_IMAGE=python:3.11-slim-bookworm.
# The made base trusts what this machine trusts: its CA bundle (/etc/ssl/certs/ca-certificates.crt) is
# copied in, because a package proxy's TLS certificate may be signed by a local CA, and pip inside the
# build must reach the package index through it.
#
# The engine. podman is preferred, then docker (only when its daemon answers). Some machines need more
# than a bare `podman`, and this script adds it, printing what it chose with `engine`:
#   --cgroup-manager=cgroupfs   when systemd is not PID 1 (podman's default manager is systemd);
#   --runtime=runc              on cgroup v1 / hybrid layouts, which crun refuses, when runc is installed;
#   --ulimit nofile=N:N, nproc=N:N   this machine's hard limits (nproc at most the kernel's pid_max): podman's
#                               defaults for root exceed them on some VMs, and the OCI runtime's setrlimit fails.
# `engine` prints two lines: the engine command (with its global flags), and the flags that `build`, `run`
# and `create` need (tests/deploy/test_image.py runs its containers with both).
#
# Environment: ENGINE (podman or docker), PYTHON_IMAGE, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# EXTRA_BUILD_ARGS (more `build` arguments, e.g. "--build-arg TORCH_INDEX_URL=...").
# Exit status: 0 built; 2 usage; 3 no working podman or docker; 4 the base cannot be made here.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE_IMAGE=localhost/digits-python:bookworm-2   # bump the suffix when the base recipe changes
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "build.sh: $*" >&2; }

# --- the engine ---------------------------------------------------------------------------------------

ENGINE_CMD=()
CREATE_FLAGS=()

hard_limit() {  # the hard limit `ulimit -H$1`, or nothing when unlimited
    local value
    value=$(ulimit -H"$1")
    [[ $value == unlimited ]] || echo "$value"
}

choose_engine() {
    local want=${ENGINE:-} flags=() nofile nproc pid_max
    if [[ -z $want || $want == podman ]] && command -v podman >/dev/null 2>&1; then
        [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]] || flags+=(--cgroup-manager=cgroupfs)
        if [[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) != cgroup2fs ]] && command -v runc >/dev/null 2>&1; then
            flags+=(--runtime=runc)
        fi
        if podman "${flags[@]}" info >/dev/null 2>&1; then
            ENGINE_CMD=(podman "${flags[@]}")
            nofile=$(hard_limit n)
            nproc=$(hard_limit u)
            # conmon, and so the container, gets an nproc limit no higher than the kernel's pid_max, and a
            # container cannot raise a hard limit (it has no CAP_SYS_RESOURCE).
            pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo "")
            if [[ -n $pid_max && ( -z $nproc || $nproc -gt $pid_max ) ]]; then nproc=$pid_max; fi
            [[ -z $nofile ]] || CREATE_FLAGS+=(--ulimit "nofile=$nofile:$nofile")
            [[ -z $nproc ]] || CREATE_FLAGS+=(--ulimit "nproc=$nproc:$nproc")
            return 0
        fi
        [[ $want != podman ]] || { say "podman is installed but \`podman ${flags[*]} info\` fails"; return 1; }
    fi
    if [[ -z $want || $want == docker ]] && command -v docker >/dev/null 2>&1; then
        if docker info >/dev/null 2>&1; then
            ENGINE_CMD=(docker)
            return 0
        fi
        say "docker is installed but its daemon does not answer (\`docker info\` fails)"
    fi
    return 1
}

require_engine() {
    if ! choose_engine; then
        say "no working container engine: install podman (apt-get install podman runc), or run a docker daemon"
        exit 3
    fi
}

engine() { "${ENGINE_CMD[@]}" "$@"; }

image_exists() { engine image inspect "$1" >/dev/null 2>&1; }

# --- the base image -------------------------------------------------------------------------------------

make_base() {
    if [[ -n ${PYTHON_IMAGE:-} ]]; then
        say "base: PYTHON_IMAGE=$PYTHON_IMAGE (as given)"
        return 0
    fi
    PYTHON_IMAGE=$BASE_IMAGE
    if image_exists "$BASE_IMAGE"; then
        say "base: reusing $BASE_IMAGE"
        return 0
    fi
    if [[ $(id -u) != 0 ]] || ! command -v debootstrap >/dev/null 2>&1; then
        say "base: $BASE_IMAGE does not exist and cannot be made here (needs root and debootstrap:" \
            "apt-get install debootstrap); or set PYTHON_IMAGE=python:3.11-slim-bookworm where Docker Hub is reachable"
        exit 4
    fi
    local rootfs started
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/digits-rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$rootfs'" EXIT
    started=$SECONDS
    say "base: debootstrap bookworm (minbase + python3, python3-venv, ca-certificates) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 4; }
    rm -f "$rootfs.log"
    # python:3.11-slim has `python`; the Dockerfile's build stages call it by that name.
    ln -sf python3 "$rootfs/usr/bin/python"
    if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    fi
    # What only the installation needed (downloaded packages, the archive's indexes), and what a server image
    # never reads: manual pages, info, translations, documentation but the copyright files (about 50 MB;
    # Debian's own -slim images leave out the same).
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
        "$rootfs"/usr/share/man "$rootfs"/usr/share/info "$rootfs"/usr/share/locale "$rootfs"/usr/share/lintian
    find "$rootfs"/usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs"/usr/share/doc -mindepth 1 -type d -empty -delete
    tar -C "$rootfs" -c . | engine import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "base: made $BASE_IMAGE in $((SECONDS - started)) s"
}

# --- the image ------------------------------------------------------------------------------------------

build() {
    local target=runtime tag="" started
    while [[ $# -gt 0 ]]; do
        case $1 in
            --target) target=$2; shift 2 ;;
            --tag) tag=$2; shift 2 ;;
            *) say "unknown argument $1"; exit 2 ;;
        esac
    done
    if [[ -z $tag ]]; then
        case $target in
            train) tag=localhost/digits-train:1.0.0 ;;
            runtime-gpu) tag=localhost/digits:1.0.0-gpu ;;
            *) tag=localhost/digits:1.0.0 ;;
        esac
    fi
    make_base
    local flags=("${CREATE_FLAGS[@]}" --network host --target "$target" --tag "$tag"
                 --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    # podman writes OCI images by default, and the OCI format has no HEALTHCHECK: it would be dropped.
    [[ ${ENGINE_CMD[0]} != podman ]] || flags+=(--format docker)
    # shellcheck disable=SC2206  # word splitting is the point: several arguments in one variable
    local extra=(${EXTRA_BUILD_ARGS:-})
    started=$SECONDS
    say "build: ${ENGINE_CMD[*]} build --target $target --tag $tag (base $PYTHON_IMAGE)"
    engine build "${flags[@]}" "${extra[@]}" --file "$ROOT/Dockerfile" "$ROOT"
    say "build: $tag in $((SECONDS - started)) s"
}

command=${1:-build}
[[ $# -eq 0 ]] || shift
case $command in
    engine)
        require_engine
        echo "${ENGINE_CMD[*]}"
        echo "${CREATE_FLAGS[*]}"
        ;;
    base) require_engine; make_base; echo "$PYTHON_IMAGE" ;;
    build) require_engine; build "$@" ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) say "unknown command $command (engine, base, build)"; exit 2 ;;
esac
