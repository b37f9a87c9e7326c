#!/usr/bin/env bash
# Runs berth's whole test suite: unit, raw-HTTP integration, crash safety, and real clients
# (skopeo, dockerd, containerd, Debian's docker-registry), and the Debian package
# (tests/deb_package.sh). Installs the clients first if missing.
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
# tests/deb_package.sh: build (cargo-deb's dependency and strip tools), install, verify, serve.
need dpkg-shlibdeps dpkg-dev
need strip binutils
need adduser adduser
need systemd-analyze systemd
need curl curl
# tests/docs.rs runs the TLS guide's openssl commands.
need openssl openssl
# tests/regions.rs puts two berth regions in network namespaces joined by a veth pair.
need ip iproute2
# The PostgreSQL metadata backend is tested against a real server: each test process starts a
# private cluster on a loopback port (src/testbed.rs), as the postgres user.
need /usr/lib/postgresql postgresql
if ((${#packages[@]})); then
  echo "installing test clients: ${packages[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# src/store/s3.rs tests the S3 blob backend against a real S3 server on loopback: s3s-fs (not
# in Debian; a crates.io binary, about two minutes to build on two cores).
command -v s3s-fs >/dev/null 2>&1 || [[ -x "$HOME/.cargo/bin/s3s-fs" ]] ||
  cargo install s3s-fs --version 0.14.1 --features binary --locked

# Two cores: keep the daemon-heavy tests from starving each other.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
cargo test --all-targets "$@"

# The real clients again, against berth on an S3 bucket and PostgreSQL (issue 14's bar: skopeo,
# dockerd and containerd on the hub's backends). Only in a whole run.
if (($# == 0)); then
  BERTH_REAL_CLIENTS_PEER=berth-shared cargo test --test real_clients
fi

# The Debian package: builds it (scripts/deb.sh: one release build), then installs, checks and
# purges it (skips with a reason when not root). Only in a whole run: arguments select tests.
if (($# == 0)); then
  tests/deb_package.sh
else
  echo "tests/deb_package.sh: not run (arguments select tests: $*)"
fi
