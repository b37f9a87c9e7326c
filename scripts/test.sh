#!/usr/bin/env bash
# Runs berth's whole test suite: unit, raw-HTTP integration, crash safety, and real clients
# (skopeo, dockerd, containerd, Debian's docker-registry). Installs the clients first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
need() { # need COMMAND-OR-PATH PACKAGE
  if [[ "$1" == /* ]]; then [[ -e "$1" ]] || packages+=("$2"); else command -v "$1" >/dev/null 2>&1 || packages+=("$2"); fi
}
need skopeo skopeo
need /usr/sbin/dockerd docker.io   # where Debian installs it (not /usr/bin)
need /usr/bin/docker docker.io
need containerd containerd
need ctr containerd
need runc runc
need /bin/busybox busybox-static
need docker-registry docker-registry
need htpasswd apache2-utils
if ((${#packages[@]})); then
  echo "installing test clients: ${packages[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# Two cores: keep the daemon-heavy tests from starving each other.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
cargo test --all-targets "$@"
