#!/usr/bin/env bash
# Replication throughput on loopback (issue 13): berth A -> berth B, one SIZE_MB layer of random
# bytes, push mode, one execution run by hand (`berth replication run`). Prints MB/s and the
# CPU seconds per GiB of each server, and checks the destination's blob. Ports 5901 and 5902.
#   cargo build --release && benches/replication.sh      # SIZE_MB=1024 CHUNK=8388608 LIMIT=
# Run as root on a quiet machine (it drops the page cache before the copy).
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/berth}
[[ -x "$BIN" ]] || { echo "no $BIN: cargo build --release first" >&2; exit 1; }
D=$(mktemp -d /tmp/rb.XXXX)
SIZE_MB=${SIZE_MB:-1024}
mk() { # NAME PORT EXTRA
  mkdir -p "$D/$1"
  printf 'data_dir = "%s/%s/data"\n[[listen]]\naddr = "127.0.0.1:%s"\n[[registry]]\nname = "library"\n%s\n' "$D" "$1" "$2" "$3" > "$D/$1/config.toml"
  RUST_LOG=warn "$BIN" serve --config "$D/$1/config.toml" > "$D/$1/log" 2>&1 &
  echo $! > "$D/$1/pid"
}
mk b 5902 ""
mk a 5901 "$(printf "[replication]\nchunk_bytes = %s" "${CHUNK:-8388608}")"
sleep 1
head -c $((SIZE_MB<<20)) /dev/urandom > "$D/layer"
L=sha256:$(sha256sum "$D/layer" | cut -d' ' -f1)
echo '{"x":1}' > "$D/config"
C=sha256:$(sha256sum "$D/config" | cut -d' ' -f1)
up() { # POST, then PUT the whole body (as benches/load.sh)
  loc=$(curl -sf -X POST -D - -o /dev/null http://127.0.0.1:5901/v2/library/big/blobs/uploads/ | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case "$loc" in http*) ;; *) loc="http://127.0.0.1:5901$loc";; esac
  sep='?'; [[ "$loc" == *\?* ]] && sep='&'
  curl -sSf -X PUT -H "Expect:" -H "content-type: application/octet-stream" -T "$2" "$loc${sep}digest=$1" -o /dev/null
}
up "$L" "$D/layer"; up "$C" "$D/config"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' "$C" "$(stat -c%s "$D/config")" "$L" "$(stat -c%s "$D/layer")" > "$D/manifest"
curl -sf -X PUT -H 'content-type: application/vnd.oci.image.manifest.v1+json' --data-binary @"$D/manifest" http://127.0.0.1:5901/v2/library/big/manifests/v1 -o /dev/null
"$BIN" --server http://127.0.0.1:5901 replication endpoint add b --url http://127.0.0.1:5902 >/dev/null
"$BIN" --server http://127.0.0.1:5901 replication rule add big --endpoint b --registry library ${LIMIT:+--bandwidth-limit $LIMIT} >/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
read -r a0 < <(awk '{print $14+$15}' /proc/$(cat $D/a/pid)/stat)
read -r b0 < <(awk '{print $14+$15}' /proc/$(cat $D/b/pid)/stat)
t0=$(date +%s.%N)
"$BIN" --server http://127.0.0.1:5901 replication run big --json > "$D/run.json"
t1=$(date +%s.%N)
read -r a1 < <(awk '{print $14+$15}' /proc/$(cat $D/a/pid)/stat)
read -r b1 < <(awk '{print $14+$15}' /proc/$(cat $D/b/pid)/stat)
tck=$(getconf CLK_TCK)
python3 - "$t0" "$t1" "$SIZE_MB" "$a0" "$a1" "$b0" "$b1" "$tck" <<'PY'
import sys
t0,t1,mb,a0,a1,b0,b1,tck=map(float,sys.argv[1:])
s=t1-t0
print(f"replicated {mb:.0f} MiB in {s:.2f} s: {mb*1.048576/s:.0f} MB/s; CPU s per GiB: source {(a1-a0)/tck/(mb/1024):.2f}, destination {(b1-b0)/tck/(mb/1024):.2f}")
PY
got=sha256:$(curl -sf "http://127.0.0.1:5902/v2/library/big/blobs/$L" | sha256sum | cut -d" " -f1); [[ "$got" == "$L" ]] && echo "destination blob matches" || echo "MISMATCH"
kill "$(cat $D/a/pid)" "$(cat $D/b/pid)"; sleep 1; rm -rf "$D"
