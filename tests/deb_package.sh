#!/usr/bin/env bash
# The Debian package, tested as Debian installs it (issue 11 item 14). Needs root and dpkg:
# builds the .deb with scripts/deb.sh (one release build, in CARGO_TARGET_DIR), then
#   dpkg -i            -> berth user and group, files, owners, modes, conffile, enabled unit,
#                         `systemd-analyze verify`, the installed binary serving GET /v2/ as
#                         berth from (a copy of) /etc/berth/config.toml
#   dpkg -i again      -> an edited config, the data and the user's uid stay
#   dpkg -r            -> configuration, data and user stay
#   dpkg --purge       -> user, group and configuration go; /var/lib/berth stays
#   dpkg -i again      -> the kept data is given to the new berth user (another uid) and opens
#   REMOVE-ON-PURGE + dpkg --purge -> /var/lib/berth goes too
# Run by scripts/test.sh. Refuses to run on a machine where berth is installed (it would
# purge it); cleans up what it installed, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "tests/deb_package.sh: SKIPPED: needs root (dpkg -i, adduser, runuser)"
  exit 0
fi
if ! command -v dpkg >/dev/null 2>&1; then
  echo "tests/deb_package.sh: SKIPPED: not a Debian system (no dpkg)"
  exit 0
fi

failures=0
fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}
die() {
  echo "FAIL: $*" >&2
  exit 1
}
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then echo "ok: $what"; else fail "$what"; fi
}
owner_mode() { stat -c '%U:%G %a' "$1"; }
expect_owner_mode() { # expect_owner_mode PATH "user:group mode"
  local got
  got=$(owner_mode "$1" 2>&1) || true
  if [[ "$got" == "$2" ]]; then echo "ok: $1 is $2"; else fail "$1 is '$got', expected '$2'"; fi
}
is_installed() { [[ "$(dpkg-query -W -f '${db:Status-Abbrev}' berth 2>/dev/null)" == "ii " ]]; }
user_exists() { getent passwd berth >/dev/null; }
group_exists() { getent group berth >/dev/null; }

if dpkg-query -W -f '${db:Status-Abbrev}' berth 2>/dev/null | grep -q '^[ir]'; then
  die "a berth package is installed or its config is left (dpkg -l berth): refusing to touch it"
fi
for p in /etc/berth /var/lib/berth; do
  [[ ! -e $p ]] || die "$p exists: refusing to touch an existing berth installation"
done
user_exists && die "a berth user exists: refusing to touch an existing berth installation"
group_exists && die "a berth group exists: refusing to touch an existing berth installation"

work=$(mktemp -d)
chmod 0755 "$work" # the berth user reads the test's config copy from here
server_pid=""
uid_taker=berth-deb-test
cleanup() {
  [[ -z "$server_pid" ]] || kill "$server_pid" 2>/dev/null || true
  dpkg --purge berth >/dev/null 2>&1 || true
  rm -rf /var/lib/berth
  getent passwd "$uid_taker" >/dev/null && deluser --quiet --system "$uid_taker" >/dev/null 2>&1
  getent group "$uid_taker" >/dev/null && delgroup --quiet --system "$uid_taker" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# Waits (up to 30 s) until the server's stdout names its address; prints it.
wait_for_address() {
  local deadline=$((SECONDS + 30)) addr
  while ((SECONDS < deadline)); do
    addr=$(sed -n 's|^berth listening on \(http://[0-9.]*:[0-9]*\)$|\1|p' "$work/stdout" | head -n 1)
    if [[ -n "$addr" ]]; then
      echo "$addr"
      return 0
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "server did not start; its stderr:" >&2
  cat "$work/stderr" >&2
  return 1
}

# ------------------------------------------------------------------------------------------
echo "== building the package (scripts/deb.sh)"
start=$SECONDS
deb=$(scripts/deb.sh)
echo "built $deb in $((SECONDS - start)) s"
[[ -f "$deb" && "$deb" == *.deb ]] || die "scripts/deb.sh printed '$deb', not a .deb file"

echo "== the package's control data"
check "package is named berth" test "$(dpkg-deb -f "$deb" Package)" = berth
depends=$(dpkg-deb -f "$deb" Depends)
for dep in adduser init-system-helpers libc6; do
  check "Depends has $dep ($depends)" grep -qw "$dep" <<<"$depends"
done
check "/etc/berth/config.toml is a conffile" \
  grep -qx /etc/berth/config.toml < <(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)

# ------------------------------------------------------------------------------------------
echo "== dpkg -i"
dpkg -i "$deb" || die "dpkg -i failed"
check "package installed" is_installed

check "user berth exists" user_exists
check "group berth exists" group_exists
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd berth)
check "berth is a system user (uid $uid < 1000)" test "$uid" -lt 1000
check "berth's primary group is berth" test "$(getent group "$gid" | cut -d: -f1)" = berth
check "berth's home is /var/lib/berth ($home)" test "$home" = /var/lib/berth
check "berth cannot log in ($shell)" test "$shell" = /usr/sbin/nologin
first_uid=$uid

expect_owner_mode /usr/bin/berth "root:root 755"
check "/usr/bin/berth runs" /usr/bin/berth version
expect_owner_mode /etc/berth "root:berth 750"
expect_owner_mode /etc/berth/config.toml "root:berth 640"
check "dpkg records /etc/berth/config.toml as a conffile" \
  grep -q '^ /etc/berth/config.toml [0-9a-f]\{32\}$' < <(dpkg-query -W -f '${Conffiles}\n' berth)
check "config.toml sets data_dir = /var/lib/berth" grep -qx 'data_dir = "/var/lib/berth"' /etc/berth/config.toml
check "config.toml listens on 127.0.0.1:5000" grep -qx 'addr = "127.0.0.1:5000"' /etc/berth/config.toml
expect_owner_mode /var/lib/berth "berth:berth 750"

unit=/lib/systemd/system/berth.service
check "$unit is installed" test -f "$unit"
check "the unit runs /usr/bin/berth with /etc/berth/config.toml" \
  grep -qx 'ExecStart=/usr/bin/berth serve --config /etc/berth/config.toml' "$unit"
check "the unit runs as berth" grep -qx 'User=berth' "$unit"
if verify=$(systemd-analyze verify "$unit" 2>&1) && [[ -z "$verify" ]]; then
  echo "ok: systemd-analyze verify $unit"
else
  fail "systemd-analyze verify $unit: ${verify:-non-zero exit}"
fi
check "the unit is enabled (multi-user.target.wants)" \
  test -L /etc/systemd/system/multi-user.target.wants/berth.service
check "the berth user reads the config (check-config)" \
  runuser -u berth -- /usr/bin/berth check-config --config /etc/berth/config.toml >/dev/null

echo "== the installed binary serves as berth from /etc/berth/config.toml (port 0: a free one)"
sed 's|^addr = "127.0.0.1:5000"$|addr = "127.0.0.1:0"|' /etc/berth/config.toml >"$work/config.toml"
chmod 0644 "$work/config.toml"
# setpriv (util-linux, like runuser) execs berth as the berth user: $! is the server itself.
setpriv --reuid=berth --regid=berth --init-groups -- \
  /usr/bin/berth serve --config "$work/config.toml" >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
addr=$(wait_for_address) || die "berth serve did not start"
echo "listening on $addr"
status=$(curl -sS -o "$work/v2.json" -w '%{http_code}' "$addr/v2/") || status="curl failed"
check "GET /v2/ answers 200 (got $status)" test "$status" = 200
check "a registry is created through the running server" \
  runuser -u berth -- /usr/bin/berth --server "$addr" registry create kept
check "the server runs as berth" test "$(stat -c %U "/proc/$server_pid" 2>&1)" = berth
kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
check "the store is in /var/lib/berth, owned by berth" \
  test -z "$(find /var/lib/berth ! -user berth -print -quit)" -a -d /var/lib/berth/meta

echo "== dpkg -i over the installed package: an edited config and the data stay, with their owners"
echo '# edited by the operator' >>/etc/berth/config.toml
dpkg -i "$deb" || die "dpkg -i over the installed package failed"
check "the edited config is kept" grep -qx '# edited by the operator' /etc/berth/config.toml
expect_owner_mode /etc/berth/config.toml "root:berth 640"
expect_owner_mode /var/lib/berth "berth:berth 750"
check "the user keeps its uid" test "$(id -u berth)" = "$first_uid"

# ------------------------------------------------------------------------------------------
echo "== dpkg -r: configuration, data and user stay"
dpkg -r berth || die "dpkg -r failed"
check "binary removed" test ! -e /usr/bin/berth
check "unit removed" test ! -e "$unit"
check "config kept" test -f /etc/berth/config.toml
check "data kept" test -d /var/lib/berth/meta
check "user kept" user_exists

echo "== dpkg --purge: user, group and configuration go, data stays"
dpkg --purge berth || die "dpkg --purge failed"
check "user berth removed" bash -c '! getent passwd berth'
check "group berth removed" bash -c '! getent group berth'
check "/etc/berth removed" test ! -e /etc/berth
check "unit no longer enabled" test ! -e /etc/systemd/system/multi-user.target.wants/berth.service
check "/var/lib/berth kept" test -d /var/lib/berth/meta
expect_owner_mode /var/lib/berth "root:root 700"
check "no file in /var/lib/berth is left to berth's old uid" \
  test -z "$(find /var/lib/berth ! -user root -print -quit)"

echo "== dpkg -i again, with berth's old uid taken: the kept data goes to the new user"
adduser --quiet --system --group --no-create-home --home /nonexistent "$uid_taker"
dpkg -i "$deb" || die "second dpkg -i failed"
IFS=: read -r _ _ uid _ < <(getent passwd berth)
echo "berth had uid $first_uid, now $uid"
expect_owner_mode /var/lib/berth "berth:berth 750"
check "every file in /var/lib/berth belongs to berth" \
  test -z "$(find /var/lib/berth ! -user berth -print -quit)"
check "the kept registry is there" \
  grep -qw kept < <(runuser -u berth -- /usr/bin/berth --config /etc/berth/config.toml registry list 2>&1)

echo "== REMOVE-ON-PURGE, then dpkg --purge: the data goes too"
touch /var/lib/berth/REMOVE-ON-PURGE
dpkg --purge berth || die "dpkg --purge failed"
check "user berth removed" bash -c '! getent passwd berth'
check "/var/lib/berth removed" test ! -e /var/lib/berth

if ((failures)); then
  echo "tests/deb_package.sh: $failures check(s) FAILED" >&2
  exit 1
fi
echo "tests/deb_package.sh: all checks passed"
