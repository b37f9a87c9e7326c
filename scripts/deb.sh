#!/usr/bin/env bash
# Builds berth's Debian package with cargo-deb (configured in Cargo.toml under
# [package.metadata.deb]) and prints the path of the .deb on stdout; everything else goes to
# stderr. Installs cargo-deb first when it is missing. Honours CARGO_TARGET_DIR.
#
#   scripts/deb.sh             # -> target/debian/berth_0.1.0-1_amd64.deb, binary stripped
#   scripts/deb.sh --dbgsym    # the same, plus berth-dbgsym_….ddeb with the debug symbols
#                              # (its path goes to stderr)
# Arguments are passed to `cargo deb`; without any, it gets --strip.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb computes the libc dependency with dpkg-shlibdeps and strips with binutils' strip.
for tool in dpkg-shlibdeps:dpkg-dev strip:binutils; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || {
    echo "deb.sh: ${tool%%:*} is missing: apt-get install ${tool#*:}" >&2
    exit 1
  }
done

cargo_deb_version=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qF "$cargo_deb_version"; then
  echo "installing cargo-deb $cargo_deb_version (cargo install --locked)" >&2
  cargo install cargo-deb --locked --version "$cargo_deb_version" >&2
fi

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n "$target_dir" ]] || { echo "deb.sh: cargo metadata gave no target_directory" >&2; exit 1; }

# One release build; cargo deb below packages it as built (--no-build).
cargo build --release --locked --bin berth >&2

# /etc/berth/config.toml: config.example.toml with the packaged data directory.
mkdir -p "$target_dir/release/deb"
config="$target_dir/release/deb/config.toml"
{
  echo "# /etc/berth/config.toml, installed by the berth Debian package. A conffile: your changes"
  echo "# survive upgrades (dpkg asks before replacing a changed file). The unit runs"
  echo "# \`berth serve --config /etc/berth/config.toml\` as the berth user; check changes with"
  echo "# \`berth check-config --config /etc/berth/config.toml\`, then \`systemctl restart berth\`."
  echo "# It is config.example.toml (/usr/share/doc/berth/) with data_dir = \"/var/lib/berth\";"
  echo "# every other option is at its default: plain HTTP on 127.0.0.1:5000 only. To serve other"
  echo "# hosts, create the first admin (README.md) and change [[listen]] addr."
  echo "#"
  sed 's|^data_dir = .*|data_dir = "/var/lib/berth"|' config.example.toml
} >"$config"
grep -qx 'data_dir = "/var/lib/berth"' "$config" || {
  echo "deb.sh: config.example.toml has no data_dir line to set" >&2
  exit 1
}

# cargo deb prints the path of each package it made on stdout.
(($#)) || set -- --strip
made=$(cargo deb --no-build --locked "$@")
grep -v '\.deb$' <<<"$made" >&2 || true
grep '\.deb$' <<<"$made"
