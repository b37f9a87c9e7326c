#!/usr/bin/env bash
# berth scale-out benchmark, side by side on 127.0.0.1: berth on the filesystem + sled (the
# default), berth on S3 (s3s-fs) + PostgreSQL, a second such node, Debian's docker-registry on
# the same S3 server, and the S3 server read directly.
#
# Not part of the test suite: run it by hand (see benches/README.md). Needs what
# scripts/test.sh installs (postgresql, s3s-fs, docker-registry) plus wrk, curl and jq; runs
# PostgreSQL as the postgres user when run as root.
#
#   benches/scale_out.sh              # 256 MiB blobs, ~2 min plus the build
#   BLOB_MB=64 benches/scale_out.sh   # smaller
#
# Environment: BLOB_MB [256] blob size of the push and GET rows; PAR_N [8] concurrent GETs of
# the aggregate row (split over two nodes in its 2-node column); WRK_DURATION [10s];
# WRK_CONNS [64]; BERTH_BIN [] a berth binary instead of building target/release/berth;
# KEEP [0] 1: keep the temp dir.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BLOB_MB=${BLOB_MB:-256}
PAR_N=${PAR_N:-8}
WRK_DURATION=${WRK_DURATION:-10s}
WRK_CONNS=${WRK_CONNS:-64}
KEEP=${KEEP:-0}
AK=bench-key
SK=bench-secret
MANIFEST_TYPE=application/vnd.oci.image.manifest.v1+json

die() { echo "scale_out.sh: $*" >&2; exit 1; }
for tool in curl jq wrk docker-registry; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
S3S=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
[[ -x $S3S ]] || die "s3s-fs is missing (scripts/test.sh installs it)"
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[[ -x $PG_BIN/postgres ]] || die "PostgreSQL is missing (apt-get install postgresql)"

if [[ -n ${BERTH_BIN:-} ]]; then
  BERTH=$BERTH_BIN
else
  (cd "$ROOT" && cargo build --release --quiet) || die "berth did not build"
  BERTH=$ROOT/target/release/berth
fi

TMP=$(mktemp -d /tmp/berth-scale-out.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -n ${PG_DATA:-} ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1
  if [[ $KEEP == 1 ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  die "nothing listens on port $1"
}
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
now() { date +%s.%N; }
mbps() { if [[ $2 == fail* ]]; then echo "n/a ($2)"; else echo "$1 $2" | awk '{ printf "%.0f MB/s", $1 / $2 / 1e6 }'; fi; }

# --- PostgreSQL and the S3 server -----------------------------------------------------------
PG_DIR=$TMP/pg
mkdir -p "$PG_DIR"
[[ $(id -u) == 0 ]] && chown postgres "$PG_DIR"
PG_DATA=$PG_DIR/data
PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -A trust -U berth --no-sync -E UTF8 --locale C -D "$PG_DATA" >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/log" -w \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null
as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U berth -d postgres -qc 'CREATE DATABASE hub' >/dev/null

S3_PORT=$(free_port)
mkdir -p "$TMP/s3/berth" "$TMP/s3/dreg"
"$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key $AK --secret-key $SK "$TMP/s3" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$S3_PORT"

# --- servers --------------------------------------------------------------------------------
# start_berth NAME EXTRA_TOML: prints the port
start_berth() {
  local name=$1 extra=$2 port
  port=$(free_port)
  mkdir -p "$TMP/$name"
  cat >"$TMP/$name/config.toml" <<EOF
data_dir = "$TMP/$name/data"
log = "warn"
[[listen]]
addr = "127.0.0.1:$port"
[[registry]]
name = "library"
$extra
EOF
  "$BERTH" --config "$TMP/$name/config.toml" serve >"$TMP/$name/log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
  echo "$port"
}
SHARED="[storage]
kind = \"s3\"
endpoint = \"http://127.0.0.1:$S3_PORT\"
bucket = \"berth\"
prefix = \"hub\"
access_key_id = \"$AK\"
secret_access_key = \"$SK\"
[metadata]
kind = \"postgres\"
url = \"postgres://berth@127.0.0.1:$PG_PORT/hub\""
FS_PORT=$(start_berth fs "")
# The nodes also cache the filesystem berth (registry "hub"): the cold-fetch row.
SHARED="$SHARED
[[image_cache]]
name = \"src\"
kind = \"registry\"
url = \"http://127.0.0.1:$FS_PORT\"
[[registry]]
name = \"hub\"
type = \"cache\"
cache = \"src\""
N1_PORT=$(start_berth node1 "$SHARED")
N2_PORT=$(start_berth node2 "$SHARED")

DREG_PORT=$(free_port)
cat >"$TMP/dreg.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  s3:
    accesskey: $AK
    secretkey: $SK
    region: us-east-1
    regionendpoint: http://127.0.0.1:$S3_PORT
    bucket: dreg
    secure: false
    v4auth: true
  redirect:
    disable: true
http:
  addr: 127.0.0.1:$DREG_PORT
EOF
# A CA bundle from the environment makes the AWS SDK of docker-registry 2.8 panic at start.
env -u AWS_CA_BUNDLE docker-registry serve "$TMP/dreg.yml" >"$TMP/dreg.log" 2>&1 &
PIDS+=($!)
wait_port "$DREG_PORT"

# --- data -----------------------------------------------------------------------------------
BLOB=$TMP/blob
head -c $((BLOB_MB << 20)) /dev/urandom >"$BLOB"
DIGEST=sha256:$(sha256sum "$BLOB" | cut -d' ' -f1)
SIZE=$(stat -c %s "$BLOB")

# push PORT [FILE DIGEST]: a monolithic upload (POST, then PUT with the body); prints seconds
push() {
  local port=$1 file=${2:-$BLOB} digest=${3:-$DIGEST} loc t0 t1 code
  loc=$(curl -sS -o /dev/null -w '%header{location}' -X POST "http://127.0.0.1:$port/v2/library/app/blobs/uploads/")
  [[ $loc == http* ]] || loc=http://127.0.0.1:$port$loc
  [[ $loc == *\?* ]] && sep='&' || sep='?'
  t0=$(now)
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary @"$file" "$loc${sep}digest=$digest")
  t1=$(now)
  if [[ $code != 201 ]]; then echo "failed: $code"; return; fi
  echo "$t1 - $t0" | bc -l
}
# get URL [CURL ARGS...]: one GET of the blob; prints seconds
get() {
  local url=$1 t0 t1 n
  shift
  t0=$(now)
  n=$(curl -sS -o /dev/null -w '%{size_download}' "$@" "$url" || true)
  t1=$(now)
  if [[ $n != "$SIZE" ]]; then echo "failed: $n bytes"; return; fi
  echo "$t1 - $t0" | bc -l
}
# manifest PORT: an image manifest tagged v1 over the blob (and an empty config)
manifest() {
  local port=$1 cfg cfg_digest body code
  cfg='{}'
  cfg_digest=sha256:$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)
  curl -sS -o /dev/null -X POST --data-binary "$cfg" -H 'Content-Type: application/octet-stream' \
    "http://127.0.0.1:$port/v2/library/app/blobs/uploads/?digest=$cfg_digest"
  body=$(jq -cn --arg c "$cfg_digest" --arg l "$DIGEST" --argjson s "$SIZE" \
    '{schemaVersion: 2, mediaType: "'$MANIFEST_TYPE'",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: 2},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $s}]}')
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X PUT -H "Content-Type: $MANIFEST_TYPE" \
    --data-binary "$body" "http://127.0.0.1:$port/v2/library/app/manifests/v1")
  [[ $code == 201 ]] || die "manifest push to $port -> $code"
}
# rps PORT: manifest GETs by tag per second (wrk)
rps() {
  wrk -t2 -c"$WRK_CONNS" -d"$WRK_DURATION" -H "Accept: $MANIFEST_TYPE" \
    "http://127.0.0.1:$1/v2/library/app/manifests/v1" | awk '/Requests\/sec/ { printf "%.0f", $2 }'
}
# parallel N URL...: N concurrent GETs spread over the URLs in turn; prints aggregate MB/s
parallel() {
  local n=$1 t0 t1 i urls getters=()
  shift
  urls=("$@")
  t0=$(now)
  for ((i = 0; i < n; i++)); do
    curl -sS -o /dev/null "${urls[i % ${#urls[@]}]}" &
    getters+=($!)
  done
  wait "${getters[@]}"
  t1=$(now)
  mbps "$((n * SIZE))" "$(echo "$t1 - $t0" | bc -l)"
}

echo "berth scale-out benchmark: ${BLOB_MB} MiB blob, $(nproc) cores, $(date -u +%FT%TZ)"
PUSH_FS=$(push "$FS_PORT")
PUSH_S3=$(push "$N1_PORT")
# docker-registry 2.8's S3 driver lists multipart uploads at each commit, which s3s-fs 0.14.1
# does not implement (501): its rows say so instead of a figure.
PUSH_DREG=$(push "$DREG_PORT")
T0=$(now)
CODE=$(curl -sS -o /dev/null -w '%{http_code}' -T "$BLOB" --aws-sigv4 "aws:amz:us-east-1:s3" \
  --user "$AK:$SK" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
  "http://127.0.0.1:$S3_PORT/berth/direct/blob")
T1=$(now)
[[ $CODE == 200 ]] && PUSH_DIRECT=$(echo "$T1 - $T0" | bc -l) || PUSH_DIRECT="failed: $CODE"
[[ $PUSH_FS == fail* || $PUSH_S3 == fail* ]] && die "berth refused the push: $PUSH_FS / $PUSH_S3"
printf '| push, %d MiB monolithic | fs+sled %s | S3+PostgreSQL %s | docker-registry on S3 %s | s3s-fs direct PUT %s |\n' \
  "$BLOB_MB" "$(mbps "$SIZE" "$PUSH_FS")" "$(mbps "$SIZE" "$PUSH_S3")" "$(mbps "$SIZE" "$PUSH_DREG")" \
  "$(mbps "$SIZE" "$PUSH_DIRECT")"

blob_url() { echo "http://127.0.0.1:$1/v2/library/app/blobs/$DIGEST"; }
GET_FS=$(get "$(blob_url "$FS_PORT")")
GET_S3=$(get "$(blob_url "$N1_PORT")")
GET_S3_N2=$(get "$(blob_url "$N2_PORT")")
GET_DREG=$(get "$(blob_url "$DREG_PORT")")
S3_KEY=hub/blobs/sha256/${DIGEST#sha256:}
GET_DIRECT=$(get "http://127.0.0.1:$S3_PORT/berth/$S3_KEY" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" \
  -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD')
printf '| blob GET, one stream | fs+sled %s | S3+PostgreSQL node 1 %s, node 2 %s | docker-registry on S3 %s | s3s-fs direct %s |\n' \
  "$(mbps "$SIZE" "$GET_FS")" "$(mbps "$SIZE" "$GET_S3")" "$(mbps "$SIZE" "$GET_S3_N2")" \
  "$(mbps "$SIZE" "$GET_DREG")" "$(mbps "$SIZE" "$GET_DIRECT")"

manifest "$FS_PORT"
manifest "$N1_PORT"
RPS_SLED=$(rps "$FS_PORT")
RPS_PG=$(rps "$N2_PORT")
printf '| manifest GET by tag, wrk c=%s | sled %s req/s | PostgreSQL %s req/s | ratio %s |\n' \
  "$WRK_CONNS" "$RPS_SLED" "$RPS_PG" "$(echo "$RPS_PG $RPS_SLED" | awk '{ printf "%.2f", $1 / $2 }')"

ONE=$(parallel "$PAR_N" "$(blob_url "$N1_PORT")")
TWO=$(parallel "$PAR_N" "$(blob_url "$N1_PORT")" "$(blob_url "$N2_PORT")")
printf '| blob GET, %d concurrent | 1 node %s | 2 nodes %s | ratio %s |\n' \
  "$PAR_N" "$ONE" "$TWO" "$(echo "${TWO% MB/s} ${ONE% MB/s}" | awk '{ printf "%.2f", $1 / $2 }')"

# One cold blob asked of both nodes at once, and of node 2 again 300 ms into the fetch: one
# GET at the source; each client's time to first byte against the source's own.
COLD=$TMP/cold
head -c $((BLOB_MB << 20)) /dev/urandom >"$COLD"
COLD_DIGEST=sha256:$(sha256sum "$COLD" | cut -d' ' -f1)
[[ $(push "$FS_PORT" "$COLD" "$COLD_DIGEST") != fail* ]] || die "the cold blob was not pushed"
source_gets() {
  curl -sS "http://127.0.0.1:$FS_PORT/metrics" |
    awk '/^berth_http_requests_total\{/ && /method="GET"/ && /route="blob"/ { n += $2 } END { print n + 0 }'
}
# ttfb URL: "SECONDS_TO_FIRST_BYTE BYTES"
ttfb() { curl -sS -o /dev/null -w '%{time_starttransfer} %{size_download}' "$1" || echo "0 0"; }
ms() { awk -v s="$1" -v n="$2" -v size="$SIZE" 'BEGIN { if (n != size) print "failed"; else printf "%.1f ms", s * 1000 }'; }
SRC=$(ttfb "http://127.0.0.1:$FS_PORT/v2/library/app/blobs/$COLD_DIGEST")
BEFORE=$(source_gets)
cold_url() { echo "http://127.0.0.1:$1/v2/hub/library/app/blobs/$COLD_DIGEST"; }
ttfb "$(cold_url "$N1_PORT")" >"$TMP/cold1" &
C1=$!
ttfb "$(cold_url "$N2_PORT")" >"$TMP/cold2" &
C2=$!
sleep 0.3
ttfb "$(cold_url "$N2_PORT")" >"$TMP/cold3" &
C3=$!
wait $C1 $C2 $C3
AFTER=$(source_gets)
printf '| cold blob GET, nodes 1 and 2 at once, node 2 again at +300 ms | source first byte %s | first bytes %s, %s, late %s | GETs at the source %d |\n' \
  "$(ms $SRC)" "$(ms $(cat "$TMP/cold1"))" "$(ms $(cat "$TMP/cold2"))" "$(ms $(cat "$TMP/cold3"))" \
  "$((AFTER - BEFORE))"
