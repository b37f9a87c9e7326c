#!/usr/bin/env bash
# berth load benchmark: berth vs Debian's docker-registry (CNCF distribution 2.8)
# vs nginx (sendfile, the limit for static bytes), side by side on 127.0.0.1.
#
# Not part of the test suite: run it by hand (see benches/README.md).
#
#   benches/load.sh                 # full run (1 GiB blobs, 10,000 tags, cache rows), ~9 min plus the build
#   QUICK=1 benches/load.sh         # smoke run with small sizes, ~1 min plus the build
#   BERTH=0 benches/load.sh         # peers only (berth not built / not started)
#   CACHE=0 benches/load.sh         # origin rows only;  ORIGIN=0: cache rows only
#
# Environment (defaults in brackets; QUICK=1 lowers them):
#   BLOB_MB [1024]      size of the single-stream GET blob and of each timed push
#   PAR_MB [64]         size of the blob fetched by the concurrent GETs
#   PAR_N [16]          concurrent GETs for the aggregate-throughput row
#   RSS_N [64]          concurrent GET streams while peak RSS is measured
#   RSS_RATE []         optional curl --limit-rate per RSS stream (e.g. 50M: slow clients)
#   CHUNK_MB [16]       PATCH size of the chunked push
#   TAGS [10000]        tags pushed for the tag-list row
#   TAG_PAR [16]        concurrent manifest PUTs while pushing them
#   TAGLIST_RUNS [300]  tag-list requests timed (median, p99 reported)
#   GET_RUNS [3]        repetitions of the GET rows (median reported)
#   WRK_DURATION [10s]  WRK_CONNS [64]  WRK_THREADS [2]   (manifest GET: wrk; HEAD: ab, same c and duration)
#   BERTH [auto]        auto: build and include berth if the build succeeds; 1: required; 0: skip
#   BERTH_BIN []        use this binary instead of building target/release/berth
#   LOGS [0]            1: servers log at their usual info level (default: warn, no access log)
#   KEEP [0]            1: keep the temp dir (logs, configs, data) for inspection
#   TIMEOUT [3600]      hard limit in seconds for the whole run after the build (600 with QUICK=1)
#   RESULTS []          also write the results as TSV to this file
#   NGINX_WORKERS [auto]  nginx worker_processes
# Cache rows (pull-through: a source registry, berth's cache registry vs docker-registry in
# proxy mode, each started cold with a fresh data dir):
#   ORIGIN [1]          0: skip the origin rows (push, GET, manifest, RSS, tags)
#   CACHE [1]           0: skip the cache rows
#   NETS ["direct relay"]  network settings for the cache rows: direct = edge -> source on
#                       loopback; relay = through benches/relay.py (throttled, delayed, counting)
#   RELAY_RATE [100]    relay: MB/s (10^6) of the source -> edge direction, all connections together
#   RELAY_DELAY [20]    relay: ms added to each direction (round trip + 2x, like netem delay on lo)
#   COLD_RUNS [3]       cold single GETs per edge and setting (a fresh edge each; median reported)
#   HERD_MB [256]  HERD_N [32]   blob size and number of concurrent cold GETs (the herd)
#   IDLE_N [1000]       idle keep-alive connections held open while manifest GETs run (RSS, req/s)
#   SLOW_N [500]  SLOW_RATE [256K]  slow readers of the parallel blob (RSS per stream), SLOW_SECS [8] long
#   CACHE_TTL [30s]     berth's revalidate_ttl for the cached-manifest row (a ttl 0 row follows)
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  : "${BLOB_MB:=32}" "${PAR_MB:=4}" "${PAR_N:=4}" "${RSS_N:=8}" "${CHUNK_MB:=4}"
  : "${TAGS:=200}" "${TAGLIST_RUNS:=30}" "${GET_RUNS:=1}" "${WRK_DURATION:=2s}" "${TIMEOUT:=600}"
  : "${COLD_RUNS:=1}" "${HERD_MB:=16}" "${HERD_N:=8}" "${IDLE_N:=200}" "${SLOW_N:=50}" "${SLOW_SECS:=4}"
fi
BLOB_MB=${BLOB_MB:-1024}
PAR_MB=${PAR_MB:-64}
PAR_N=${PAR_N:-16}
RSS_N=${RSS_N:-64}
RSS_RATE=${RSS_RATE:-}
CHUNK_MB=${CHUNK_MB:-16}
TAGS=${TAGS:-10000}
TAG_PAR=${TAG_PAR:-16}
TAGLIST_RUNS=${TAGLIST_RUNS:-300}
GET_RUNS=${GET_RUNS:-3}
WRK_DURATION=${WRK_DURATION:-10s}
WRK_CONNS=${WRK_CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
BERTH=${BERTH:-auto}
BERTH_BIN=${BERTH_BIN:-}
LOGS=${LOGS:-0}
KEEP=${KEEP:-0}
TIMEOUT=${TIMEOUT:-3600}
RESULTS=${RESULTS:-}
NGINX_WORKERS=${NGINX_WORKERS:-auto}
ORIGIN=${ORIGIN:-1}
CACHE=${CACHE:-1}
NETS=${NETS:-direct relay}
RELAY_RATE=${RELAY_RATE:-100}
RELAY_DELAY=${RELAY_DELAY:-20}
COLD_RUNS=${COLD_RUNS:-3}
HERD_MB=${HERD_MB:-256}
HERD_N=${HERD_N:-32}
CACHE_TTL=${CACHE_TTL:-30s}
IDLE_N=${IDLE_N:-1000}
SLOW_N=${SLOW_N:-500}
SLOW_RATE=${SLOW_RATE:-256K}
SLOW_SECS=${SLOW_SECS:-8}
# Servers and clients hold thousands of sockets in the idle and slow-reader rows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

REPO=bench/app                  # image name in both registries (berth: registry "bench", image "app")
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json'
MT_MANIFEST=application/vnd.oci.image.manifest.v1+json

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "missing $1 (apt-get install -y $2)"; }
need curl curl; need wrk wrk; need ab apache2-utils; need nginx nginx-light; need docker-registry docker-registry
need jq jq; need awk mawk; need openssl openssl; need ss iproute2
[[ $CACHE == 0 ]] || need python3 python3

# ---------------------------------------------------------------- build
if [[ $BERTH != 0 && -z $BERTH_BIN ]]; then
  log "building berth (cargo build --release)"
  if (cd "$ROOT" && timeout "${BUILD_TIMEOUT:-3600}" cargo build --release 2>&1 | tail -n 5 >&2; exit "${PIPESTATUS[0]}"); then
    BERTH_BIN=$ROOT/target/release/berth
  elif [[ $BERTH == 1 ]]; then
    die "cargo build --release failed"
  else
    log "WARNING: berth does not build: running the peers only"
    BERTH=0
  fi
fi
[[ $BERTH == 0 || -x $BERTH_BIN ]] || die "no berth binary at $BERTH_BIN"

# ---------------------------------------------------------------- temp dir, cleanup, watchdog
D=$(mktemp -d /tmp/berth-bench.XXXXXX)
chmod 755 "$D"                 # nginx workers (user nobody) read $D/www
PIDS=()                        # servers, stopped in reverse order
WATCHDOG=
descendants() { # PID: every descendant process, children after their own descendants
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; echo "$c"; done
}
cleanup() {
  local rc=$?
  set +e                       # best effort from here on: a failed kill must not end the cleanup
  trap - EXIT
  trap '' INT TERM             # a late signal must not cut the cleanup short
  [[ -n $WATCHDOG ]] && kill "$WATCHDOG" 2>/dev/null
  # clients still running (curl/wrk/ab, also those started from subshells), by PID: every
  # child of this shell but the servers (stopped below), with its descendants
  local c j i
  for c in $(ps -o pid= --ppid $$ 2>/dev/null); do
    [[ " ${PIDS[*]} " == *" $c "* ]] && continue
    for j in $(descendants "$c") "$c"; do kill -TERM "$j" 2>/dev/null || true; done
  done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    local t=0
    while kill -0 "${PIDS[i]}" 2>/dev/null && ((t++ < 100)); do sleep 0.1; done
    kill -KILL "${PIDS[i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then log "kept $D"; else rm -rf "$D"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
# the watchdog signals this shell, then its children by parent PID (a foreground curl/wrk
# would otherwise delay the trap until it ends)
(
  trap 'kill "$sp" 2>/dev/null; exit 0' TERM
  sleep "$TIMEOUT" & sp=$!
  wait "$sp"
  echo "[watchdog] $TIMEOUT s elapsed: stopping the benchmark" >&2
  kill -TERM $$; pkill -TERM -P $$
) >/dev/null &
WATCHDOG=$!

# ---------------------------------------------------------------- helpers
now() { echo "${EPOCHREALTIME/,/.}"; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NaN"; else print a[int((NR + 1) / 2)] }'; }
pctl() { sort -g | awk -v p="$1" '{ a[NR] = $1 } END { i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; print (NR ? a[i] : "NaN") }'; }
MB() { calc "$1 / 1000000" 1; }

# free_port: sets P to a port in 20000-31999 (below the ephemeral range) that nothing listens on
# and that this script has not handed out yet
USED_PORTS=" "
free_port() {
  local listening; listening=$(ss -Htln | awk '{ n = split($4, a, ":"); print a[n] }')
  while :; do
    P=$((20000 + RANDOM % 12000))
    grep -qx "$P" <<<"$listening" || [[ $USED_PORTS == *" $P "* ]] || break
  done
  USED_PORTS+="$P "
}

wait_http() { # URL NAME PID: poll until any HTTP answer, with a 30 s deadline
  local deadline=$((SECONDS + 30))
  until curl -s -o /dev/null --max-time 2 "$1"; do
    kill -0 "$3" 2>/dev/null || die "$2 exited during start-up (logs in $D)"
    ((SECONDS < deadline)) || die "$2 not answering on $1 after 30 s"
    sleep 0.1
  done
}

abs_url() { case $2 in http://*|https://*) echo "$2" ;; /*) echo "$1$2" ;; *) echo "$1/$2" ;; esac; }
with_digest() { if [[ $1 == *\?* ]]; then echo "$1&digest=$2"; else echo "$1?digest=$2"; fi; }

# upload_start BASE -> absolute upload URL
upload_start() {
  local out
  out=$(curl -sS -X POST -o /dev/null -w '%{http_code} %header{location}' --max-time 30 "$1/v2/$REPO/blobs/uploads/")
  [[ ${out%% *} == 202 ]] || die "POST $1/v2/$REPO/blobs/uploads/ -> $out"
  abs_url "$1" "${out#* }"
}

# push_mono BASE FILE DIGEST: POST, then PUT ?digest= with the whole body
push_mono() {
  local loc code
  loc=$(upload_start "$1")
  code=$(curl -sS -X PUT -T "$2" -H 'Expect:' -H 'Content-Type: application/octet-stream' \
    -o "$D/body" -w '%{http_code}' --max-time 600 "$(with_digest "$loc" "$3")")
  [[ $code == 201 ]] || die "monolithic PUT to $1 -> $code: $(head -c 300 "$D/body")"
}

# push_chunked BASE CHUNKDIR DIGEST: POST, PATCH per chunk with Content-Range, PUT ?digest=.
# One curl per request and no other process in the loop: the client's share of the time is small.
push_chunked() {
  local loc out code off=0 size f chunk=$((CHUNK_MB * 1048576))
  loc=$(upload_start "$1")
  for f in "$2"/c.*; do
    size=$((BLOB_BYTES - off < chunk ? BLOB_BYTES - off : chunk))
    out=$(curl -sS -X PATCH -T "$f" -H 'Expect:' -H 'Content-Type: application/octet-stream' \
      -H "Content-Range: $off-$((off + size - 1))" -o "$D/body" -w '%{http_code} %{time_total} %header{location}' \
      --max-time 300 "$loc")
    code=${out%% *}; out=${out#* }
    [[ $code == 202 ]] || die "PATCH $f to $1 -> $code: $(head -c 300 "$D/body")"
    echo "${out%% *}" >>"$D/patch.times"; out=${out#* }
    case $out in http://*) loc=$out ;; /*) loc=$1$out ;; *) die "PATCH: no Location ($out)" ;; esac
    off=$((off + size))
  done
  code=$(curl -sS -X PUT -H 'Content-Length: 0' -o "$D/body" -w '%{http_code}' --max-time 300 \
    "$(with_digest "$loc" "$3")")
  [[ $code == 201 ]] || die "final chunked PUT to $1 -> $code: $(head -c 300 "$D/body")"
}

put_manifest() { # BASE REF
  local code
  code=$(curl -sS -X PUT --data-binary "@$D/manifest.json" -H "Content-Type: $MT_MANIFEST" \
    -o "$D/body" -w '%{http_code}' --max-time 30 "$1/v2/$REPO/manifests/$2")
  [[ $code == 201 ]] || die "PUT manifest $2 to $1 -> $code: $(head -c 300 "$D/body")"
}

cpu_ticks() { # PID...: utime+stime of the processes (and their threads)
  local p t=0
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    t=$((t + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$t"
}
HZ=$(getconf CLK_TCK)

# get_single URL SERVER_PID...: sets SPEED (median bytes/s over GET_RUNS runs, after one
# warm-up) and CPU (server CPU seconds per GiB sent)
get_single() {
  local url=$1 i c0 c1; shift
  curl -sSf -o /dev/null --max-time 600 "$url" || die "GET $url failed"
  : >"$D/speeds"
  c0=$(cpu_ticks "$@")
  for ((i = 0; i < GET_RUNS; i++)); do
    curl -sSf -o /dev/null --max-time 600 -w '%{speed_download}\n' "$url" >>"$D/speeds" || die "GET $url failed"
  done
  c1=$(cpu_ticks "$@")
  CPU=$(calc "($c1 - $c0) / $HZ / $GET_RUNS / ($BLOB_MB / 1024)" 2)
  SPEED=$(median <"$D/speeds")
}

# get_parallel URL N SIZE_BYTES [RATE] -> aggregate bytes/s (N curls at once, wall clock)
get_parallel() {
  local url=$1 n=$2 bytes=$3 rate=${4:-} i t0 t1 fail=0
  local -a p=() extra=()
  [[ -n $rate ]] && extra=(--limit-rate "$rate")
  t0=$(now)
  for ((i = 0; i < n; i++)); do
    curl -sSf -o /dev/null --max-time 600 "${extra[@]}" "$url" & p+=($!)
  done
  for i in "${p[@]}"; do wait "$i" || fail=1; done
  t1=$(now)
  ((fail == 0)) || die "a parallel GET of $url failed"
  calc "$n * $bytes / ($t1 - $t0)" 0
}

get_parallel_median() {
  local i
  curl -sSf -o /dev/null --max-time 600 "$1" || die "GET $1 failed"
  for ((i = 0; i < GET_RUNS; i++)); do get_parallel "$@"; echo; done | median
}

# wrk_run URL -> "req/s p50_ms p99_ms non2xx" (GET)
wrk_run() {
  local out
  out=$(timeout 120 wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency --timeout 5s \
    -H "$ACCEPT" "$1") || die "wrk $1 failed"
  printf '%s\n' "$out" >>"$D/wrk.log"
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v }
    $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 } /Non-2xx/ { bad = $NF }
    END { printf "%.0f %.3f %.3f %d\n", rps, p50, p99, bad + 0 }' <<<"$out"
}

# ab_head URL -> "req/s p50_ms p99_ms non2xx" (HEAD). wrk 4.1 cannot do HEAD: its parser waits
# for the Content-Length bytes of a HEAD answer and never completes a request. ab is one thread.
ab_head() {
  local out secs=${WRK_DURATION%s}
  out=$(timeout 120 ab -q -i -k -c "$WRK_CONNS" -t "$secs" -n 100000000 -s 5 -H "$ACCEPT" \
    -e "$D/ab.csv" "$1" 2>&1) || die "ab -i $1 failed: $(tail -n 3 <<<"$out")"
  printf '%s\n' "$out" >>"$D/ab.log"
  local p50 p99 rps bad
  p50=$(awk -F, '$1 == 50 { print $2 }' "$D/ab.csv"); p99=$(awk -F, '$1 == 99 { print $2 }' "$D/ab.csv")
  rps=$(awk '/^Requests per second:/ { printf "%.0f", $4 }' <<<"$out")
  bad=$(awk '/^Non-2xx responses:/ { n += $3 } /^Failed requests:/ { n += $3 } END { print n + 0 }' <<<"$out")
  echo "$rps $p50 $p99 $bad"
}

# rss_under_load PID URL: reset the high-water mark, run RSS_N streams, read VmHWM (MiB)
rss_under_load() {
  local pid=$1 url=$2
  { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || log "WARNING: cannot reset VmHWM of $pid (reported peak is since start)"
  get_parallel "$url" "$RSS_N" "$PAR_BYTES" "$RSS_RATE" >/dev/null
  awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status"
}

# idle_conns HOST:PORT N SECONDS: N keep-alive connections, each after one GET /v2/, held idle;
# prints "ready" once all are open and answered, then holds them SECONDS (or until killed)
idle_conns() {
  exec python3 - "$@" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, hold = int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
    socks.append(s)
for s in socks:
    s.settimeout(30)
    if not s.recv(65536):
        sys.exit("a connection closed before its answer")
print("ready", flush=True)
time.sleep(hold)
PY
}

# idle_row SERVER: RSS with IDLE_N idle connections, and manifest GET req/s from wrk meanwhile
idle_row() {
  local s=$1 before fifo pid rps p50 p99 bad line
  before=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$s]}/status")
  fifo="$D/idle.$s"; mkfifo "$fifo"
  idle_conns "${URL[$s]#http://}" "$IDLE_N" 60 >"$fifo" & pid=$!
  exec {fd}<"$fifo"
  read -r -t 120 line <&"$fd" || die "$s: $IDLE_N idle connections did not open"
  [[ $line == ready ]] || die "$s: idle connections: $line"
  R[idle_rss.$s]=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$s]}/status")
  R[idle_kib.$s]=$(calc "(${R[idle_rss.$s]} - $before) * 1024 / $IDLE_N" 1)
  read -r rps p50 p99 bad < <(wrk_run "${URL[$s]}/v2/$REPO/manifests/latest")
  R[idle_rps.$s]=$rps; R[idle_p99.$s]=$p99
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  exec {fd}<&-; rm -f "$fifo"
  log "$s: $IDLE_N idle connections: RSS $before -> ${R[idle_rss.$s]} MiB (${R[idle_kib.$s]} KiB each); manifest GET meanwhile $rps req/s, p99 $p99 ms"
}

# slow_row SERVER: SLOW_N readers at SLOW_RATE for SLOW_SECS; peak RSS over the baseline, per stream
slow_row() {
  local s=$1 url=$2 before i
  local -a p=()
  before=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$s]}/status")
  { echo 5 >"/proc/${PID[$s]}/clear_refs"; } 2>/dev/null || true
  for ((i = 0; i < SLOW_N; i++)); do
    curl -s -o /dev/null --limit-rate "$SLOW_RATE" --max-time "$SLOW_SECS" "$url" & p+=($!)
  done
  for i in "${p[@]}"; do wait "$i" || true; done
  R[slow_hwm.$s]=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$s]}/status")
  R[slow_kib.$s]=$(calc "(${R[slow_hwm.$s]} - $before) * 1024 / $SLOW_N" 1)
  log "$s: $SLOW_N slow readers at $SLOW_RATE/s: peak RSS ${R[slow_hwm.$s]} MiB (from $before: ${R[slow_kib.$s]} KiB per stream)"
}

push_tags() { # BASE COUNT: PUT the manifest under tagNNNNN, TAG_PAR at a time, one curl process
  local i cfg=$D/tags.curl
  : >"$cfg"
  for ((i = 0; i < $2; i++)); do
    printf 'url = "%s/v2/%s/manifests/tag%05d"\nupload-file = "%s"\noutput = "/dev/null"\n' "$1" "$REPO" "$i" "$D/manifest.json" >>"$cfg"
  done
  curl -sS --no-progress-meter --parallel --parallel-max "$TAG_PAR" -K "$cfg" -H "Content-Type: $MT_MANIFEST" \
    -H 'Expect:' --max-time 10 --fail-early -w '%{http_code}\n' >"$D/tags.codes" 2>"$D/tags.err" || true
  local ok; ok=$(grep -c '^201$' "$D/tags.codes" || true)
  [[ $ok == "$2" ]] || { log "ERROR: tag push to $1: $ok of $2 answered 201 ($(sort "$D/tags.codes" | uniq -c | tr -s ' \n' ' '))"; return 1; }
}

# taglist BASE -> "median_ms p99_ms" of GET tags/list?n=100&last=tag05000 on one kept-alive connection
taglist() {
  local url="$1/v2/$REPO/tags/list?n=100&last=tag$(printf %05d $((TAGS / 2)))" i
  local -a args=()
  for ((i = 0; i < TAGLIST_RUNS; i++)); do args+=(-o /dev/null "$url"); done
  curl -sSf -o "$D/taglist.json" --max-time 10 "$url" || die "GET $url failed"
  curl -sSf --max-time 120 -w '%{time_total}\n' "${args[@]}" >"$D/taglist.times" || die "GET $url failed"
  local med p99
  med=$(awk '{ print $1 * 1000 }' "$D/taglist.times" | median)
  p99=$(awk '{ print $1 * 1000 }' "$D/taglist.times" | pctl 99)
  echo "$med $p99"
}

# ---------------------------------------------------------------- content
BLOB_BYTES=$((BLOB_MB * 1048576))
PAR_BYTES=$((PAR_MB * 1048576))
log "generating content in $D ($BLOB_MB MiB$([[ $ORIGIN == 1 ]] && echo ' x2'), $PAR_MB MiB)"
mkdir -p "$D/www" "$D/chunks"
gen() { # FILE SEED BYTES: fast pseudo-random bytes (AES-CTR keystream)
  (set +o pipefail; openssl enc -aes-128-ctr -nosalt -pass "pass:$2" -pbkdf2 </dev/zero 2>/dev/null | head -c "$3" >"$1")
  [[ $(stat -c %s "$1") == "$3" ]] || die "could not generate $1"
}
gen "$D/www/big" big "$BLOB_BYTES"          # monolithic push, single-stream GET, cold GET through the cache
if [[ $ORIGIN == 1 ]]; then
  gen "$D/chunked" chunked "$BLOB_BYTES"    # chunked push (distinct content)
  (cd "$D/chunks" && split -b "${CHUNK_MB}M" -d -a 4 "$D/chunked" c.)
else
  printf x >"$D/chunked"                    # only its digest goes into the manifest
fi
gen "$D/www/par" par "$PAR_BYTES"           # concurrent GETs, RSS
chmod 644 "$D/www/big" "$D/www/par"; chmod 755 "$D/www"
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}' >"$D/config.json"
dg() { echo "sha256:$(openssl dgst -sha256 -r "$1" | cut -d' ' -f1)"; }
DG_BIG=$(dg "$D/www/big"); DG_CHUNKED=$(dg "$D/chunked"); DG_PAR=$(dg "$D/www/par"); DG_CFG=$(dg "$D/config.json")
jq -cn --arg c "$DG_CFG" --argjson cs "$(stat -c %s "$D/config.json")" \
  --arg b "$DG_BIG" --argjson bs "$BLOB_BYTES" --arg k "$DG_CHUNKED" --arg p "$DG_PAR" --argjson ps "$PAR_BYTES" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
    layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $b, size: $bs},
             {mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $k, size: $bs},
             {mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $p, size: $ps}]}' >"$D/manifest.json"

# ---------------------------------------------------------------- CPU references
# What moving a GiB costs at least on this machine: SHA-256 (openssl's, as fast as the sha2
# crate berth uses) and one copy (a read of the cached file into user space); each the median of
# three, in CPU seconds per GiB.
declare -A R   # R[metric.server] = value
cpu_of() { # COMMAND... -> user+sys CPU seconds
  /usr/bin/time -f '%U %S' -o "$D/time.out" "$@" >/dev/null 2>&1 || die "$* failed"
  awk '{ print $1 + $2 }' "$D/time.out"
}
cat "$D/www/big" >/dev/null
for i in 1 2 3; do cpu_of dd if="$D/www/big" of=/dev/null bs=1M; done | median >"$D/ref.copy"
for i in 1 2 3; do cpu_of openssl dgst -sha256 "$D/www/big"; done | median >"$D/ref.dgst"
R[ref_copy]=$(calc "$(cat "$D/ref.copy") / ($BLOB_MB / 1024)" 3)
R[ref_sha]=$(calc "$(cat "$D/ref.dgst") / ($BLOB_MB / 1024) - ${R[ref_copy]}" 3)
R[ref_sha_mbs]=$(calc "1073.741824 / ${R[ref_sha]}" 0)
R[ref_push]=$(calc "${R[ref_sha]} + ${R[ref_copy]}" 3)
R[ref_cold]=$(calc "${R[ref_sha]} + 2 * ${R[ref_copy]}" 3)
log "references: SHA-256 ${R[ref_sha]} CPU s per GiB (${R[ref_sha_mbs]} MB/s), one copy ${R[ref_copy]} s per GiB"

# ---------------------------------------------------------------- servers

# start_berth NAME CONFIG [LOG]: starts berth, sets BPID and BURL (read from its "listening on" line)
start_berth() {
  local name=$1 conf=$2 dir; dir=$(dirname "$2")
  NO_COLOR=1 RUST_LOG=${3:-$BERTH_LOG} "$BERTH_BIN" serve --config "$conf" >"$dir/out" 2>"$dir/err" &
  BPID=$!; PIDS+=($!)
  local deadline=$((SECONDS + 30))
  until grep -qx 'berth ready' "$dir/out" 2>/dev/null; do
    kill -0 "$BPID" 2>/dev/null || die "$name exited during start-up: $(tail -n 5 "$dir/err")"
    ((SECONDS < deadline)) || die "$name did not print 'berth ready' within 30 s"
    sleep 0.05
  done
  BURL=$(sed -n 's|^berth listening on \(http://[^ ]*\).*|\1|p' "$dir/out" | head -n 1)
  BURL2=$(sed -n 's|^berth listening on \(http://[^ ]*\).*|\1|p' "$dir/out" | sed -n 2p)
  [[ -n $BURL ]] || die "$name printed no listening address"
}

# stop_pid PID: SIGTERM, SIGKILL after 10 s, and forget it
stop_pid() {
  local t=0 i
  kill -TERM "$1" 2>/dev/null || true
  while kill -0 "$1" 2>/dev/null && ((t++ < 100)); do sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for i in "${!PIDS[@]}"; do [[ ${PIDS[i]} == "$1" ]] && unset 'PIDS[i]'; done
  PIDS=("${PIDS[@]}")
}

# registry_config FILE DATA_DIR PORT [PROXY_URL] [ACCESS_DISABLED]
registry_config() {
  cat >"$1" <<EOF
version: 0.1
log:
  level: $REG_LOG
  accesslog:
    disabled: ${5:-$REG_ACCESS}
storage:
  filesystem:
    rootdirectory: $2
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$3
EOF
  [[ -z ${4:-} ]] || printf 'proxy:\n  remoteurl: %s\n' "$4" >>"$1"
}

declare -A URL PID
declare -A R   # R[metric.server] = value
if [[ $LOGS == 1 ]]; then REG_LOG=info; REG_ACCESS=false; BERTH_LOG=info; else REG_LOG=warn; REG_ACCESS=true; BERTH_LOG=warn; fi
SERVERS=()
if [[ $ORIGIN == 1 ]]; then
# docker-registry
free_port; mkdir -p "$D/registry/data"
registry_config "$D/registry/config.yml" "$D/registry/data" "$P"
docker-registry serve "$D/registry/config.yml" >"$D/registry/log" 2>&1 &
PID[registry]=$!; PIDS+=($!); URL[registry]=http://127.0.0.1:$P
wait_http "${URL[registry]}/v2/" docker-registry "${PID[registry]}"
log "docker-registry $(docker-registry --version | awk '{print $3}') on ${URL[registry]} (pid ${PID[registry]})"

# nginx: the same files from $D/www, sendfile on, every path in $D/nginx
free_port; mkdir -p "$D/nginx"
cat >"$D/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $D/nginx/nginx.pid;
error_log $D/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  default_type application/octet-stream;
  client_body_temp_path $D/nginx/body;
  proxy_temp_path $D/nginx/proxy;
  fastcgi_temp_path $D/nginx/fastcgi;
  uwsgi_temp_path $D/nginx/uwsgi;
  scgi_temp_path $D/nginx/scgi;
  server {
    listen 127.0.0.1:$P;
    root $D/www;
  }
}
EOF
nginx -p "$D/nginx" -e "$D/nginx/error.log" -c "$D/nginx/nginx.conf" -g 'daemon off;' >"$D/nginx/out" 2>&1 &
PID[nginx]=$!; PIDS+=($!); URL[nginx]=http://127.0.0.1:$P
wait_http "${URL[nginx]}/par" nginx "${PID[nginx]}"
log "nginx $(nginx -v 2>&1 | sed 's|.*/||') on ${URL[nginx]} (pid ${PID[nginx]})"

# berth
SERVERS=(registry)
if [[ $BERTH != 0 ]]; then
  mkdir -p "$D/berth"
  cat >"$D/berth/config.toml" <<EOF
data_dir = "$D/berth/data"
log = "$BERTH_LOG"
[[listen]]
addr = "127.0.0.1:0"
# the user-space path (TLS, HTTP/2 and the cache's growing files take it too): GET rows only
[[listen]]
addr = "127.0.0.1:0"
sendfile = false
[[registry]]
name = "bench"
EOF
  start_berth berth "$D/berth/config.toml"
  PID[berth]=$BPID; URL[berth]=$BURL
  PID[berthus]=$BPID; URL[berthus]=$BURL2
  log "berth on ${URL[berth]} (pid ${PID[berth]}, $BERTH_BIN)"
  SERVERS=(berth registry)
fi

# ---------------------------------------------------------------- pushes
# Before each server's pushes, the same file is written with dd + fdatasync into the same file
# system: the write limit of this machine at that moment (it varies, see README), shown in the
# limit column of the push rows.
: >"$D/dd.speeds"
for s in "${SERVERS[@]}"; do
  b=${URL[$s]}
  push_mono "$b" "$D/config.json" "$DG_CFG"
  push_mono "$b" "$D/www/par" "$DG_PAR"
  sync
  t0=$(now); dd if="$D/www/big" of="$D/ddtest" bs=2M conv=fdatasync status=none; t1=$(now)
  rm -f "$D/ddtest"; sync
  calc "$BLOB_BYTES / ($t1 - $t0)" 0 >>"$D/dd.speeds"; echo >>"$D/dd.speeds"
  c0=$(cpu_ticks "${PID[$s]}")
  t0=$(now); push_mono "$b" "$D/www/big" "$DG_BIG"; t1=$(now)
  c1=$(cpu_ticks "${PID[$s]}")
  R[push_mono.$s]=$(calc "$BLOB_BYTES / ($t1 - $t0)" 0)
  R[pushcpu.$s]=$(calc "($c1 - $c0) / $HZ / ($BLOB_MB / 1024)" 2)
  sync
  : >"$D/patch.times"
  c0=$(cpu_ticks "${PID[$s]}")
  t0=$(now); push_chunked "$b" "$D/chunks" "$DG_CHUNKED"; t1=$(now)
  c1=$(cpu_ticks "${PID[$s]}")
  R[push_chunk.$s]=$(calc "$BLOB_BYTES / ($t1 - $t0)" 0)
  R[pushchunkcpu.$s]=$(calc "($c1 - $c0) / $HZ / ($BLOB_MB / 1024)" 2)
  R[patch_ms.$s]=$(awk '{ s += $1 } END { printf "%.1f", s * 1000 / NR }' "$D/patch.times")
  put_manifest "$b" latest
  log "$s: push monolithic $(MB "${R[push_mono.$s]}") MB/s (${R[pushcpu.$s]} CPU s/GiB), chunked $(MB "${R[push_chunk.$s]}") MB/s (${R[patch_ms.$s]} ms per PATCH); dd just before: $(MB "$(tail -n 1 "$D/dd.speeds")") MB/s"
done
R[push_mono.limit]=$(grep . "$D/dd.speeds" | median); R[push_chunk.limit]=${R[push_mono.limit]}

# every server must return exactly the bytes pushed
for s in "${SERVERS[@]}"; do
  got=$(curl -sSf --max-time 60 "${URL[$s]}/v2/$REPO/blobs/$DG_PAR" | openssl dgst -sha256 -r | cut -d' ' -f1)
  [[ sha256:$got == "$DG_PAR" ]] || die "$s returned wrong bytes for $DG_PAR"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "$ACCEPT" "${URL[$s]}/v2/$REPO/manifests/latest")
  [[ $code == 200 ]] || die "$s: GET manifest by tag -> $code"
done

blob_url() { if [[ $1 == nginx ]]; then echo "${URL[nginx]}/$2"; else echo "${URL[$1]}/v2/$REPO/blobs/$3"; fi; }
server_pids() { if [[ $1 == nginx ]]; then echo "${PID[nginx]}" $(ps -o pid= --ppid "${PID[nginx]}"); else echo "${PID[$1]}"; fi; }

# ---------------------------------------------------------------- blob GETs
GETTERS=("${SERVERS[@]}" nginx); [[ $BERTH == 0 ]] || GETTERS=(berth berthus registry nginx)
for s in "${GETTERS[@]}"; do
  # shellcheck disable=SC2046
  get_single "$(blob_url "$s" big "$DG_BIG")" $(server_pids "$s")
  R[get1.$s]=$SPEED; R[cpu.$s]=$CPU
  # shellcheck disable=SC2046
  c0=$(cpu_ticks $(server_pids "$s"))
  R[getN.$s]=$(get_parallel_median "$(blob_url "$s" par "$DG_PAR")" "$PAR_N" "$PAR_BYTES")
  # shellcheck disable=SC2046
  c1=$(cpu_ticks $(server_pids "$s"))
  # The warm-up GET of get_parallel_median counts too: GET_RUNS x PAR_N + 1 blobs sent.
  R[cpuN.$s]=$(calc "($c1 - $c0) / $HZ / (($GET_RUNS * $PAR_N + 1) * $PAR_MB / 1024)" 2)
  log "$s: GET 1 stream $(MB "${R[get1.$s]}") MB/s (${R[cpu.$s]} CPU s/GiB), ${PAR_N}x${PAR_MB} MiB $(MB "${R[getN.$s]}") MB/s (${R[cpuN.$s]} CPU s/GiB)"
done

# ---------------------------------------------------------------- manifests (wrk)
for s in "${SERVERS[@]}"; do
  for m in GET HEAD; do
    if [[ $m == GET ]]; then tool=wrk_run; else tool=ab_head; fi
    read -r rps p50 p99 bad < <($tool "${URL[$s]}/v2/$REPO/manifests/latest")
    ((bad == 0)) || log "WARNING: $s manifest $m: $bad non-2xx responses"
    R[m$m.$s]=$rps; R[m${m}50.$s]=$p50; R[m${m}99.$s]=$p99
    log "$s: manifest $m $rps req/s, p50 $p50 ms, p99 $p99 ms"
  done
done

# ---------------------------------------------------------------- peak RSS
for s in "${SERVERS[@]}"; do
  R[rss.$s]=$(rss_under_load "${PID[$s]}" "$(blob_url "$s" par "$DG_PAR")")
  R[rss0.$s]=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/${PID[$s]}/status")
  log "$s: peak RSS under ${RSS_N}x${PAR_MB} MiB GETs ${R[rss.$s]} MiB (RSS after: ${R[rss0.$s]} MiB)"
done

# ---------------------------------------------------------------- idle connections, slow readers
for s in "${SERVERS[@]}"; do
  idle_row "$s"
  slow_row "$s" "$(blob_url "$s" par "$DG_PAR")"
done

# ---------------------------------------------------------------- tag list
for s in "${SERVERS[@]}"; do
  t0=$(now)
  if ! push_tags "${URL[$s]}" "$TAGS"; then
    R[tagpush.$s]=FAIL; R[tl.$s]=FAIL; R[tl99.$s]=FAIL
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${URL[$s]}/v2/") || true
    log "$s: tag push failed; GET /v2/ now answers ${code:-nothing}"
    continue
  fi
  t1=$(now)
  R[tagpush.$s]=$(calc "$TAGS / ($t1 - $t0)" 0)
  read -r med p99 < <(taglist "${URL[$s]}")
  R[tl.$s]=$med; R[tl99.$s]=$p99
  n=$(jq '.tags | length' "$D/taglist.json"); first=$(jq -r '.tags[0]' "$D/taglist.json")
  R[tln.$s]=$n
  log "$s: $TAGS tags pushed at ${R[tagpush.$s]}/s; tag-list page median $med ms, p99 $p99 ms ($n tags, first $first)"
  want=$((TAGS - TAGS / 2 - 1)); ((want > 100)) && want=100
  if [[ $s == berth && ( $n != "$want" || $first != tag$(printf %05d $((TAGS / 2 + 1))) ) ]]; then
    log "WARNING: berth's page is not the $want tags after tag$(printf %05d $((TAGS / 2))) (got $n, first $first)"
  fi
done

# the origin servers are not needed by the cache rows: stop them (memory, page cache, CPU)
for s in berth nginx registry; do [[ -z ${PID[$s]:-} ]] || stop_pid "${PID[$s]}"; done
fi # ORIGIN

# ---------------------------------------------------------------- cache rows
# A source registry (a berth origin; docker-registry when berth is not run) holds the BLOB_MB
# blob, a HERD_MB blob and a manifest. For each network setting (NETS) and each edge (berth's
# cache registry, docker-registry in proxy mode), every row starts a fresh edge with an empty
# data dir pointed at the source, directly (direct) or through benches/relay.py (relay).
if [[ $CACHE == 1 ]]; then
HERD_BYTES=$((HERD_MB * 1048576))
log "cache rows: generating the ${HERD_MB} MiB herd blob"
gen "$D/herd" herd "$HERD_BYTES"
DG_HERD=$(dg "$D/herd")
jq -cn --arg c "$DG_CFG" --argjson cs "$(stat -c %s "$D/config.json")" \
  --arg b "$DG_BIG" --argjson bs "$BLOB_BYTES" --arg h "$DG_HERD" --argjson hs "$HERD_BYTES" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
    layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $b, size: $bs},
             {mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $h, size: $hs}]}' >"$D/cmanifest.json"

# the source logs one line per request (berth at info, docker-registry's access log): the
# request counts below are read from it
mkdir -p "$D/src"
if [[ $BERTH != 0 ]]; then
  SRC_KIND=berth
  cat >"$D/src/config.toml" <<EOF
data_dir = "$D/src/data"
log = "info"
[[listen]]
addr = "127.0.0.1:0"
[[registry]]
name = "bench"
EOF
  start_berth source "$D/src/config.toml" info
  SRC_PID=$BPID; SRC_URL=$BURL
else
  SRC_KIND=docker-registry
  free_port
  registry_config "$D/src/config.yml" "$D/src/data" "$P" "" false
  docker-registry serve "$D/src/config.yml" >"$D/src/out" 2>&1 &
  SRC_PID=$!; PIDS+=($!); SRC_URL=http://127.0.0.1:$P
  wait_http "$SRC_URL/v2/" source "$SRC_PID"
fi
push_mono "$SRC_URL" "$D/config.json" "$DG_CFG"
push_mono "$SRC_URL" "$D/www/big" "$DG_BIG"
push_mono "$SRC_URL" "$D/herd" "$DG_HERD"
code=$(curl -sS -X PUT --data-binary "@$D/cmanifest.json" -H "Content-Type: $MT_MANIFEST" \
  -o "$D/body" -w '%{http_code}' --max-time 30 "$SRC_URL/v2/$REPO/manifests/latest")
[[ $code == 201 ]] || die "PUT manifest to the source -> $code: $(head -c 300 "$D/body")"
log "source: $SRC_KIND on $SRC_URL (pid $SRC_PID) holds $BLOB_MB MiB + $HERD_MB MiB blobs and bench/app:latest"

src_lines() { cat "$D/src/out" "$D/src/err" 2>/dev/null || true; }
src_count() { # METHOD PATH: requests for PATH the source logged so far
  if [[ $SRC_KIND == berth ]]; then
    src_lines | grep -cE -- "method=$1 path=\"?$2\"? " || true
  else
    src_lines | grep -cF -- "\"$1 $2 HTTP/" || true
  fi
}
src_logged_bytes() { # body bytes of every 200/206 GET the source logged so far (%.0f: mawk's %d stops at 2^31)
  if [[ $SRC_KIND == berth ]]; then
    src_lines | awk '/ method=GET / && / status=20[06] / { if (match($0, / bytes=[0-9]+/)) s += substr($0, RSTART + 7, RLENGTH - 7) } END { printf "%.0f\n", s }'
  else
    src_lines | awk '/"GET / { for (i = 1; i < NF; i++) if ($i ~ /HTTP\/1\.[01]"$/ && $(i + 1) ~ /^20[06]$/) s += $(i + 2) } END { printf "%.0f\n", s }'
  fi
}
RELAY_PID=
relay_dump() { # fresh totals of the relay in $D/relay.json
  local m0; m0=$(stat -c %Y.%N "$D/relay.json" 2>/dev/null || echo 0)
  kill -USR1 "$RELAY_PID"
  local t=0
  while [[ $(stat -c %Y.%N "$D/relay.json" 2>/dev/null || echo 0) == "$m0" ]] && ((t++ < 50)); do sleep 0.02; done
}
src_sent() { # bytes the source sent so far: counted by the relay, else from the source's log
  if [[ -n $RELAY_PID ]]; then relay_dump; jq -r .bytes_down "$D/relay.json"; else src_logged_bytes; fi
}
settle() { # wait (up to 180 s) until the source is idle: no CPU and no relay bytes for 0.5 s
  local a b ra=0 rb=0 t=0
  a=$(cpu_ticks "$SRC_PID"); [[ -z $RELAY_PID ]] || ra=$(src_sent)
  while ((t++ < 360)); do
    sleep 0.5
    b=$(cpu_ticks "$SRC_PID"); [[ -z $RELAY_PID ]] || rb=$(src_sent)
    [[ $a == "$b" && $ra == "$rb" ]] && return 0
    a=$b; ra=$rb
  done
  log "WARNING: the source did not go idle within 180 s"
}
timed_get() { # URL -> "ttfb_s total_s bytes"
  curl -sSf -o /dev/null --max-time 900 -w '%{time_starttransfer} %{time_total} %{size_download}\n' "$1" || die "GET $1 failed"
}
ref_get() { # URL -> "median_ttfb_s median_total_s" over GET_RUNS runs after one warm-up
  local i
  timed_get "$1" >/dev/null
  for ((i = 0; i < GET_RUNS; i++)); do timed_get "$1"; done >"$D/ref.times"
  echo "$(awk '{ print $1 }' "$D/ref.times" | median) $(awk '{ print $2 }' "$D/ref.times" | median)"
}

EDGE_N=0
start_edge() { # KIND UPSTREAM_URL TTL: a fresh edge; sets EPID, EDIR and EURL (the repository's URL)
  local kind=$1 up=$2 ttl=$3
  EDIR=$D/edge-$((++EDGE_N))-$kind; mkdir -p "$EDIR"
  if [[ $kind == berth ]]; then
    cat >"$EDIR/config.toml" <<EOF
data_dir = "$EDIR/data"
log = "$BERTH_LOG"
[[listen]]
addr = "127.0.0.1:0"
[[image_cache]]
name = "up"
kind = "registry"
url = "$up"
revalidate_ttl = "$ttl"
[[registry]]
name = "hub"
type = "cache"
cache = "up"
EOF
    start_berth "berth cache" "$EDIR/config.toml"
    EPID=$BPID; EURL=$BURL/v2/hub/$REPO
  else
    free_port
    registry_config "$EDIR/config.yml" "$EDIR/data" "$P" "$up"
    docker-registry serve "$EDIR/config.yml" >"$EDIR/log" 2>&1 &
    EPID=$!; PIDS+=($!)
    wait_http "http://127.0.0.1:$P/v2/" "docker-registry proxy" "$EPID"
    EURL=http://127.0.0.1:$P/v2/$REPO
  fi
}
stop_edge() { stop_pid "$EPID"; [[ $KEEP == 1 ]] || rm -rf "$EDIR"; }

EDGES=(registry); [[ $BERTH == 0 ]] || EDGES=(berth registry)
WRK_SECS=${WRK_DURATION%s}
P_BIG=/v2/$REPO/blobs/$DG_BIG; P_HERD=/v2/$REPO/blobs/$DG_HERD; P_MAN=/v2/$REPO/manifests/latest

# the origin path's speed for the warm row: the source serving the blob itself, on loopback
get_single "$SRC_URL$P_BIG" "$SRC_PID"
R[src_warm]=$SPEED
log "source: GET ${BLOB_MB} MiB directly $(MB "$SPEED") MB/s"

for net in $NETS; do
  if [[ $net == relay ]]; then
    free_port
    python3 "$ROOT/benches/relay.py" "$P" "${SRC_URL##*:}" "$D/relay.json" --rate "$RELAY_RATE" --delay "$RELAY_DELAY" >"$D/relay.out" 2>&1 &
    RELAY_PID=$!; PIDS+=($!); UP=http://127.0.0.1:$P
    wait_http "$UP/v2/" relay "$RELAY_PID"
    log "relay on $UP -> $SRC_URL: $RELAY_RATE MB/s, +$RELAY_DELAY ms each way"
  else
    UP=$SRC_URL
  fi
  # the direct references, over the same network path as the edges
  read -r R[src_ttfb.$net] R[src_t.$net] < <(ref_get "$UP$P_BIG")
  read -r _ R[src_herd_t.$net] < <(ref_get "$UP$P_HERD")
  log "[$net] source direct: ${BLOB_MB} MiB in ${R[src_t.$net]} s (TTFB ${R[src_ttfb.$net]} s), ${HERD_MB} MiB in ${R[src_herd_t.$net]} s"
  if [[ $net == direct ]]; then
    # on loopback the herd is bound by serving HERD_N x HERD_MB, not by the one fetch: also time
    # HERD_N direct GETs at once from the source (skipped through the relay: N x the bytes)
    R[src_herdN.$net]=$(calc "$HERD_N * $HERD_BYTES / $(get_parallel "$UP$P_HERD" "$HERD_N" "$HERD_BYTES")" 3)
    log "[$net] source direct: ${HERD_N}x${HERD_MB} MiB at once in ${R[src_herdN.$net]} s"
  fi

  for e in "${EDGES[@]}"; do
    # cold single GETs, a fresh edge each; the last edge also serves the warm GETs
    : >"$D/cold.$net.$e"
    for ((r = 1; r <= COLD_RUNS; r++)); do
      start_edge "$e" "$UP" "$CACHE_TTL"
      g0=$(src_count GET "$P_BIG"); b0=$(src_sent); e0=$(cpu_ticks "$EPID")
      read -r ttfb tot size < <(timed_get "$EURL/blobs/$DG_BIG")
      [[ $size == "$BLOB_BYTES" ]] || die "$e cache: cold GET returned $size bytes, not $BLOB_BYTES"
      settle
      g1=$(src_count GET "$P_BIG"); b1=$(src_sent); e1=$(cpu_ticks "$EPID")
      ecpu=$(calc "($e1 - $e0) / $HZ / ($BLOB_MB / 1024)" 2)
      echo "$ttfb $tot $((g1 - g0)) $((b1 - b0)) $ecpu" >>"$D/cold.$net.$e"
      log "[$net] $e cache: cold GET $r/$COLD_RUNS: $tot s (TTFB $ttfb s), source GETs $((g1 - g0)), source bytes $(calc "($b1 - $b0) / $BLOB_BYTES" 3)x the blob, edge CPU $ecpu s per GiB"
      if ((r == COLD_RUNS)); then
        w0=$(src_count GET "$P_BIG")
        get_single "$EURL/blobs/$DG_BIG" "$EPID"
        R[warm.$net.$e]=$SPEED; R[warmsrc.$net.$e]=$(( $(src_count GET "$P_BIG") - w0 ))
        log "[$net] $e cache: warm GET $(MB "$SPEED") MB/s, source GETs meanwhile ${R[warmsrc.$net.$e]}"
      fi
      stop_edge
    done
    R[cold_ttfb.$net.$e]=$(awk '{ print $1 }' "$D/cold.$net.$e" | median)
    R[cold_t.$net.$e]=$(awk '{ print $2 }' "$D/cold.$net.$e" | median)
    R[cold_cpu.$net.$e]=$(awk '{ print $5 }' "$D/cold.$net.$e" | median)
    R[cold_gets.$net.$e]=$(awk '{ s += $3 } END { printf "%.2f", s / NR }' "$D/cold.$net.$e")
    R[cold_bytes.$net.$e]=$(awk -v b="$BLOB_BYTES" '{ s += $4 } END { printf "%.3f", s / NR / b }' "$D/cold.$net.$e")

    # herd: HERD_N concurrent cold GETs of the herd blob
    start_edge "$e" "$UP" "$CACHE_TTL"
    g0=$(src_count GET "$P_HERD"); b0=$(src_sent); e0=$(cpu_ticks "$EPID")
    : >"$D/herd.out"; hp=(); fail=0
    t0=$(now)
    for ((i = 0; i < HERD_N; i++)); do
      curl -sS -o /dev/null --max-time 900 -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' \
        "$EURL/blobs/$DG_HERD" >>"$D/herd.out" & hp+=($!)
    done
    for i in "${hp[@]}"; do wait "$i" || fail=1; done
    t1=$(now)
    ok=$(awk -v n="$HERD_BYTES" '$1 == 200 && $2 == n' "$D/herd.out" | wc -l)
    settle
    g1=$(src_count GET "$P_HERD"); b1=$(src_sent); e1=$(cpu_ticks "$EPID")
    R[herd_cpu.$net.$e]=$(calc "($e1 - $e0) / $HZ / ($HERD_N * $HERD_MB / 1024)" 3)
    R[herd_t.$net.$e]=$(calc "$t1 - $t0" 3); R[herd_gets.$net.$e]=$((g1 - g0))
    R[herd_bytes.$net.$e]=$(calc "($b1 - $b0) / $HERD_BYTES" 2)
    R[herd_ok.$net.$e]=$ok
    R[herd_ttfb.$net.$e]=$(awk '{ print $3 * 1000 }' "$D/herd.out" | pctl 100)
    ((ok == HERD_N && fail == 0)) || log "WARNING: [$net] $e herd: $ok of $HERD_N GETs returned the whole blob ($(awk '{ print $1 }' "$D/herd.out" | sort | uniq -c | tr -s ' \n' ' '))"
    log "[$net] $e cache: herd ${HERD_N}x${HERD_MB} MiB in ${R[herd_t.$net.$e]} s, source GETs $((g1 - g0)), source bytes ${R[herd_bytes.$net.$e]}x, slowest TTFB ${R[herd_ttfb.$net.$e]} ms"
    stop_edge

    # cached manifest GET by tag (berth: revalidate_ttl CACHE_TTL, then 0s)
    ttls=("$CACHE_TTL"); [[ $e == berth ]] && ttls+=(0s)
    for ttl in "${ttls[@]}"; do
      k=mc.$net.$e; [[ $e == berth && $ttl == 0s ]] && k=mc0.$net.$e
      start_edge "$e" "$UP" "$ttl"
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -H "$ACCEPT" "$EURL/manifests/latest")
      [[ $code == 200 ]] || die "$e cache: GET manifest by tag -> $code"
      m0=$(( $(src_count HEAD "$P_MAN") + $(src_count GET "$P_MAN") ))
      read -r rps p50 p99 bad < <(wrk_run "$EURL/manifests/latest")
      sleep 0.2
      m1=$(( $(src_count HEAD "$P_MAN") + $(src_count GET "$P_MAN") ))
      ((bad == 0)) || log "WARNING: [$net] $e cached manifest GET (ttl $ttl): $bad non-2xx responses"
      R[$k]=$rps; R[${k}50]=$p50; R[${k}99]=$p99
      R[${k}src]=$(awk -v m="$((m1 - m0))" -v r="$rps" -v d="$WRK_SECS" 'BEGIN { if (r > 0) printf "%.1f", m * 1000 / (r * d); else print "-" }')
      log "[$net] $e cache (ttl $ttl): manifest GET $rps req/s, p50 $p50 ms, p99 $p99 ms; source manifest requests $((m1 - m0)) (${R[${k}src]} per 1000)"
      stop_edge
    done
  done
  if [[ -n $RELAY_PID ]]; then
    relay_dump; cp "$D/relay.json" "$D/relay.$net.json"
    stop_pid "$RELAY_PID"; RELAY_PID=
  fi
done
stop_pid "$SRC_PID"
fi # CACHE

# ---------------------------------------------------------------- table
v() { echo "${R[$1]:--}"; }
ratio() { # A B [inverse]: A/B, or B/A for lower-is-better rows
  local a=${R[$1]:-} b=${R[$2]:-}
  [[ $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]] || { echo -; return; }
  if [[ ${3:-} == inv ]]; then awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2fx", b / a; else print "-" }'
  else awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; fi
}
mbv() { if [[ ${R[$1]:-} =~ ^[0-9.]+$ ]]; then MB "${R[$1]}"; else echo "${R[$1]:--}"; fi; }
row() { printf '%-44s %12s %12s %12s %10s %10s  %s\n' "$@"; [[ -z $RESULTS ]] || printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }
[[ -z $RESULTS ]] || : >"$RESULTS"

echo
echo "berth load benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), loopback"
echo "sizes: blob ${BLOB_MB} MiB, parallel ${PAR_N}x${PAR_MB} MiB, RSS ${RSS_N}x${PAR_MB} MiB${RSS_RATE:+ at $RSS_RATE/s each}, chunks ${CHUNK_MB} MiB, ${TAGS} tags, wrk -t$WRK_THREADS -c$WRK_CONNS -d$WRK_DURATION"
[[ $BERTH == 0 ]] && echo "berth: not run"
echo "references: SHA-256 ${R[ref_sha_mbs]:-?} MB/s on one core (${R[ref_sha]:-?} CPU s per GiB: openssl dgst -sha256 of the"
echo "       cached blob, less its read); one copy ${R[ref_copy]:-?} CPU s per GiB (dd of the cached blob to /dev/null)"
if [[ $ORIGIN == 1 ]]; then
echo "ratios: berth/peer, oriented so that >1 means berth is better (lower-is-better rows use peer/berth)"
echo
row metric berth registry limit vs-registry vs-limit target
row "blob GET ${BLOB_MB} MiB, 1 stream (MB/s)" "$(mbv get1.berth)" "$(mbv get1.registry)" "$(mbv get1.nginx)" \
  "$(ratio get1.berth get1.registry)" "$(ratio get1.berth get1.nginx)" ">=0.8x nginx"
row "  server CPU per GiB sent (s)" "$(v cpu.berth)" "$(v cpu.registry)" "$(v cpu.nginx)" \
  "$(ratio cpu.berth cpu.registry inv)" "$(ratio cpu.berth cpu.nginx inv)" ""
row "  user-space path (sendfile = false) (MB/s)" "$(mbv get1.berthus)" "$(mbv get1.registry)" "$(mbv get1.nginx)" \
  "$(ratio get1.berthus get1.registry)" "$(ratio get1.berthus get1.nginx)" ""
row "    server CPU per GiB sent (s)" "$(v cpu.berthus)" "$(v cpu.registry)" "$(v cpu.nginx)" \
  "$(ratio cpu.berthus cpu.registry inv)" "$(ratio cpu.berthus cpu.nginx inv)" "<=registry"
row "blob GET ${PAR_N}x${PAR_MB} MiB aggregate (MB/s)" "$(mbv getN.berth)" "$(mbv getN.registry)" "$(mbv getN.nginx)" \
  "$(ratio getN.berth getN.registry)" "$(ratio getN.berth getN.nginx)" ">=1.0x nginx"
row "  server CPU per GiB sent (s)" "$(v cpuN.berth)" "$(v cpuN.registry)" "$(v cpuN.nginx)" \
  "$(ratio cpuN.berth cpuN.registry inv)" "$(ratio cpuN.berth cpuN.nginx inv)" "<=1.3x nginx"
row "  user-space path (sendfile = false) (MB/s)" "$(mbv getN.berthus)" "$(mbv getN.registry)" "$(mbv getN.nginx)" \
  "$(ratio getN.berthus getN.registry)" "$(ratio getN.berthus getN.nginx)" ""
row "    server CPU per GiB sent (s)" "$(v cpuN.berthus)" "$(v cpuN.registry)" "$(v cpuN.nginx)" \
  "$(ratio cpuN.berthus cpuN.registry inv)" "$(ratio cpuN.berthus cpuN.nginx inv)" "<=registry"
for m in GET HEAD; do
  row "manifest $m by tag, c=$WRK_CONNS (req/s)$([[ $m == HEAD ]] && echo ' [ab]')" "$(v m$m.berth)" "$(v m$m.registry)" - "$(ratio m$m.berth m$m.registry)" - ">=10x registry"
  row "  p50 (ms)" "$(v m${m}50.berth)" "$(v m${m}50.registry)" - "$(ratio m${m}50.berth m${m}50.registry inv)" - ""
  row "  p99 (ms)" "$(v m${m}99.berth)" "$(v m${m}99.registry)" - "$(ratio m${m}99.berth m${m}99.registry inv)" - "<=10 ms"
done
row "push ${BLOB_MB} MiB monolithic POST+PUT (MB/s)" "$(mbv push_mono.berth)" "$(mbv push_mono.registry)" "$(mbv push_mono.limit)" \
  "$(ratio push_mono.berth push_mono.registry)" "$(ratio push_mono.berth push_mono.limit)" ">=3x registry"
row "  server CPU per GiB pushed (s)" "$(v pushcpu.berth)" "$(v pushcpu.registry)" "$(v ref_push)" "$(ratio pushcpu.berth pushcpu.registry inv)" "$(ratio pushcpu.berth ref_push inv)" "<=1.2x limit"
row "push ${BLOB_MB} MiB chunked ${CHUNK_MB} MiB PATCHes (MB/s)" "$(mbv push_chunk.berth)" "$(mbv push_chunk.registry)" "$(mbv push_chunk.limit)" \
  "$(ratio push_chunk.berth push_chunk.registry)" "$(ratio push_chunk.berth push_chunk.limit)" ">=2.5x registry"
row "  server CPU per GiB pushed (s)" "$(v pushchunkcpu.berth)" "$(v pushchunkcpu.registry)" "$(v ref_push)" "$(ratio pushchunkcpu.berth pushchunkcpu.registry inv)" "$(ratio pushchunkcpu.berth ref_push inv)" "<=1.2x limit"
row "  mean time per ${CHUNK_MB} MiB PATCH (ms)" "$(v patch_ms.berth)" "$(v patch_ms.registry)" - "$(ratio patch_ms.berth patch_ms.registry inv)" - ""
row "peak RSS, ${RSS_N}x${PAR_MB} MiB GETs (MiB)" "$(v rss.berth)" "$(v rss.registry)" - "$(ratio rss.berth rss.registry inv)" - "<=128 MiB"
row "$IDLE_N idle connections: server RSS (MiB)" "$(v idle_rss.berth)" "$(v idle_rss.registry)" - "$(ratio idle_rss.berth idle_rss.registry inv)" - ""
row "  RSS per idle connection (KiB)" "$(v idle_kib.berth)" "$(v idle_kib.registry)" - "$(ratio idle_kib.berth idle_kib.registry inv)" - ""
row "  manifest GET meanwhile, c=$WRK_CONNS (req/s)" "$(v idle_rps.berth)" "$(v idle_rps.registry)" - "$(ratio idle_rps.berth idle_rps.registry)" - ""
row "$SLOW_N slow readers at $SLOW_RATE/s: peak RSS (MiB)" "$(v slow_hwm.berth)" "$(v slow_hwm.registry)" - "$(ratio slow_hwm.berth slow_hwm.registry inv)" - ""
row "  peak RSS per slow stream (KiB)" "$(v slow_kib.berth)" "$(v slow_kib.registry)" - "$(ratio slow_kib.berth slow_kib.registry inv)" - "<=2048 KiB"
row "tag push, $TAGS manifest PUTs, $TAG_PAR at once (tags/s)" "$(v tagpush.berth)" "$(v tagpush.registry)" - "$(ratio tagpush.berth tagpush.registry)" - ""
row "tag list n=100 last=mid, median (ms)" "$(v tl.berth)" "$(v tl.registry)*" - - - "<=2 ms"
row "  p99 (ms)" "$(v tl99.berth)" "$(v tl99.registry)*" - - - ""
echo
echo "limit: GET rows: nginx (sendfile) serving the same file. Push rows: dd conv=fdatasync of the same"
echo "       file into the same file system just before each server's pushes (median): a reference for"
echo "       this disk at that moment, not a hard ceiling. Push CPU rows: the SHA-256 of a GiB plus one"
echo "       copy of it (the references below)."
echo "* docker-registry 2.8 ignores n/last: its answer held ${R[tln.registry]:-?} tags (berth: ${R[tln.berth]:-?})."
fi # ORIGIN

if [[ $CACHE == 1 ]]; then
# cache rows: "ref" is the source itself over the same network path; x = edge/ref (time: lower is
# better, speed: higher is better); TTFB: +ms over the source's
rx() { # A B -> A/B as "N.NNx"
  local a=${R[$1]:-} b=${R[$2]:-}
  [[ $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]] || { echo -; return; }
  awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'
}
dms() { # A B (seconds) -> "+N.N ms"
  local a=${R[$1]:-} b=${R[$2]:-}
  [[ $a =~ ^[0-9.]+$ && $b =~ ^[0-9.]+$ ]] || { echo -; return; }
  awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.1f ms", (a - b) * 1000 }'
}
ms() { if [[ ${R[$1]:-} =~ ^[0-9.]+$ ]]; then calc "${R[$1]} * 1000" 1; else echo -; fi; }
echo
echo "cache rows: source = $SRC_KIND origin; edges = berth cache registry (revalidate_ttl $CACHE_TTL) and docker-registry 2.8"
echo "proxy, each started cold (fresh data dir). ref = GET from the source itself over the same path;"
echo "berth-x / registry-x = edge / ref. Cold rows: median of $COLD_RUNS cold edges; herd: one edge."
echo "Edge CPU rows: ref = the SHA-256 of a GiB plus two copies (in and out), from the references above."
for net in $NETS; do
  echo
  if [[ $net == relay ]]; then echo "network: edge -> source through benches/relay.py, $RELAY_RATE MB/s shared, +$RELAY_DELAY ms each way"
  else echo "network: edge -> source directly on loopback"; fi
  row metric berth registry ref berth-x registry-x target
  row "cold GET ${BLOB_MB} MiB through the cache (s)" "$(v cold_t.$net.berth)" "$(v cold_t.$net.registry)" "$(v src_t.$net)" \
    "$(rx cold_t.$net.berth src_t.$net)" "$(rx cold_t.$net.registry src_t.$net)" "<=1.05x ref"
  row "  edge CPU per GiB (s)" "$(v cold_cpu.$net.berth)" "$(v cold_cpu.$net.registry)" "$(v ref_cold)" \
    "$(rx cold_cpu.$net.berth ref_cold)" "$(rx cold_cpu.$net.registry ref_cold)" "<=1.2x ref"
  row "  time to first byte (ms)" "$(ms cold_ttfb.$net.berth)" "$(ms cold_ttfb.$net.registry)" "$(ms src_ttfb.$net)" \
    "$(dms cold_ttfb.$net.berth src_ttfb.$net)" "$(dms cold_ttfb.$net.registry src_ttfb.$net)" "<=ref+5 ms"
  row "  source bytes sent / blob size" "$(v cold_bytes.$net.berth)" "$(v cold_bytes.$net.registry)" - - - "1.0"
  row "  source GETs of the blob per cold GET" "$(v cold_gets.$net.berth)" "$(v cold_gets.$net.registry)" - - - "1"
  row "herd ${HERD_N}x${HERD_MB} MiB cold, wall (s)" "$(v herd_t.$net.berth)" "$(v herd_t.$net.registry)" "$(v src_herd_t.$net)" \
    "$(rx herd_t.$net.berth src_herd_t.$net)" "$(rx herd_t.$net.registry src_herd_t.$net)" "<=1.2x ref (1 GET)"
  [[ -z ${R[src_herdN.$net]:-} ]] || row "  against ${HERD_N} direct GETs at once (s)" - - "$(v src_herdN.$net)" \
    "$(rx herd_t.$net.berth src_herdN.$net)" "$(rx herd_t.$net.registry src_herdN.$net)" ""
  row "  edge CPU per GiB sent to clients (s)" "$(v herd_cpu.$net.berth)" "$(v herd_cpu.$net.registry)" - - - ""
  row "  source GETs of the blob" "$(v herd_gets.$net.berth)" "$(v herd_gets.$net.registry)" - - - "1"
  row "  source bytes sent / blob size" "$(v herd_bytes.$net.berth)" "$(v herd_bytes.$net.registry)" - - - ""
  row "  slowest time to first byte (ms)" "$(v herd_ttfb.$net.berth)" "$(v herd_ttfb.$net.registry)" - - - ""
  row "  GETs that returned the whole blob" "$(v herd_ok.$net.berth)" "$(v herd_ok.$net.registry)" - - - "$HERD_N"
  row "warm GET ${BLOB_MB} MiB from the cache (MB/s)" "$(mbv warm.$net.berth)" "$(mbv warm.$net.registry)" "$(mbv src_warm)" \
    "$(rx warm.$net.berth src_warm)" "$(rx warm.$net.registry src_warm)" "~1x origin path"
  row "  source GETs meanwhile" "$(v warmsrc.$net.berth)" "$(v warmsrc.$net.registry)" - - - "0"
  row "cached manifest GET by tag, c=$WRK_CONNS (req/s)" "$(v mc.$net.berth)" "$(v mc.$net.registry)" - - - ">=10000 (berth ttl $CACHE_TTL)"
  row "  p50 (ms)" "$(v mc.$net.berth50)" "$(v mc.$net.registry50)" - - - ""
  row "  p99 (ms)" "$(v mc.$net.berth99)" "$(v mc.$net.registry99)" - - - ""
  row "  source manifest requests per 1000" "$(v mc.$net.berthsrc)" "$(v mc.$net.registrysrc)" - - - ""
  row "  berth with revalidate_ttl 0s (req/s)" "$(v mc0.$net.berth)" - - - - "(information)"
  row "    p50 / p99 (ms)" "$(v mc0.$net.berth50) / $(v mc0.$net.berth99)" - - - - ""
  row "    source manifest requests per 1000" "$(v mc0.$net.berthsrc)" - - - - ""
done
if [[ -n ${R[src_warm]:-} && " $NETS " == *" relay "* && -f $D/relay.relay.json ]]; then
  echo
  echo "relay totals (source -> edges): $(jq -r '"\(.bytes_down) bytes, \(.conns) connections"' "$D/relay.relay.json")"
fi
fi # CACHE
