#!/usr/bin/env bash
# The build steps of deploy/Dockerfile's build stage, kept in a script so that they can be run
# (and tested: tests/deploy/check) outside Docker too.
#
# Usage: deploy/docker-build.sh [options] DESTDIR
#   --deps-only        install the build dependencies with apt-get, then stop
#   --deps-installed   never run apt-get: the dependencies are there (or set OUTBOXD_DEPS_INSTALLED=1);
#                      the script then needs no root, and fails early, naming what is missing
#   --prefix DIR       installation prefix (default /usr/local): the binary lands in DESTDIR/DIR/bin
#   --build-dir DIR    meson build directory (default: a temporary one, removed at the end)
#   --src DIR          source tree (default: the folder above this script)
#
# Without --deps-installed it installs the build dependencies first (as root, with apt-get; it
# never cleans apt's lists, so it is safe on a developer's machine). It then configures the
# project with meson (the project's default build type, debugoptimized: the build the tests
# run), compiles only the daemon, and installs it stripped under DESTDIR.
#
# In the Dockerfile:  docker-build.sh --deps-only                      (a cached layer)
#                     docker-build.sh --deps-installed /staging         (after the sources)
set -euo pipefail

build_deps=(build-essential meson ninja-build pkg-config
            libpq-dev libnats-dev libjansson-dev libmicrohttpd-dev)
pc_modules=(libpq libnats jansson libmicrohttpd)

usage() {  # exit code
    sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

deps_only=0
deps_installed=0
case "${OUTBOXD_DEPS_INSTALLED:-0}" in 1|true|yes) deps_installed=1 ;; esac
prefix=/usr/local
build_dir=
src="$(cd "$(dirname "$0")/.." && pwd)"
destdir=

while [ $# -gt 0 ]; do
    case "$1" in
        --deps-only) deps_only=1 ;;
        --deps-installed) deps_installed=1 ;;
        --prefix) prefix=${2:?--prefix needs a value}; shift ;;
        --prefix=*) prefix=${1#*=} ;;
        --build-dir) build_dir=${2:?--build-dir needs a value}; shift ;;
        --build-dir=*) build_dir=${1#*=} ;;
        --src) src=${2:?--src needs a value}; shift ;;
        --src=*) src=${1#*=} ;;
        -h|--help) usage 0 ;;
        -*) echo "docker-build.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$destdir" ] || usage; destdir=$1 ;;
    esac
    shift
done

if [ "$deps_only" -eq 1 ] && [ "$deps_installed" -eq 1 ]; then
    echo "docker-build.sh: --deps-only and --deps-installed exclude each other" >&2
    exit 2
fi

if [ "$deps_installed" -eq 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "docker-build.sh: installing the build dependencies needs root" \
             "(or pass --deps-installed)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${build_deps[@]}"
fi
[ "$deps_only" -eq 1 ] && exit 0

if [ -z "$destdir" ]; then
    echo "docker-build.sh: DESTDIR is missing" >&2
    usage
fi
case "$prefix" in /*) ;; *) echo "docker-build.sh: --prefix must be absolute" >&2; exit 2 ;; esac

# Fail early, with names, when a dependency is missing.
missing=()
for tool in meson ninja pkg-config cc; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if command -v pkg-config >/dev/null 2>&1; then
    for m in "${pc_modules[@]}"; do
        pkg-config --exists "$m" || missing+=("pkg-config module $m")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-build.sh: missing: ${missing[*]} (Debian: ${build_deps[*]})" >&2
    exit 1
fi

mkdir -p "$destdir"
destdir="$(cd "$destdir" && pwd)"
if [ -z "$build_dir" ]; then
    build_dir="$(mktemp -d "${TMPDIR:-/tmp}/outboxd-build.XXXXXX")"
    trap 'rm -rf "$build_dir"' EXIT
fi

setup_args=()
[ -f "$build_dir/build.ninja" ] && setup_args=(--reconfigure)   # a reused --build-dir
meson setup "${setup_args[@]}" "$build_dir" "$src" --prefix "$prefix"
meson compile -C "$build_dir" outboxd
meson install -C "$build_dir" --no-rebuild --strip --destdir "$destdir"
"$destdir$prefix/bin/outboxd" --version
