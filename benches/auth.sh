#!/usr/bin/env bash
# berth access-control and webhook overhead, on 127.0.0.1 (not part of the test suite).
#
#   benches/auth.sh            # ~1 min plus the release build
#
# Rows:
#   manifest GET by tag, req/s: anonymous (an anonymous_pull registry, auth on) vs a bearer
#     token vs Basic access-key credentials on every request (target: authorized >= 0.8x anonymous)
#   token issuance, req/s: GET /service/token with Basic credentials (memoized after the first
#     argon2 check), and anonymous
#   push latency (blob + manifest by tag, sequential): no webhook vs a webhook whose receiver
#     sleeps 2 s per delivery (target: unchanged)
#
# Environment: WRK_DURATION [10s] WRK_CONNS [64] WRK_THREADS [2] PUSHES [200] BERTH_BIN []
#   KEEP [0] (1: keep the temp dir)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRK_DURATION=${WRK_DURATION:-10s}
WRK_CONNS=${WRK_CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
PUSHES=${PUSHES:-200}
KEEP=${KEEP:-0}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
for t in curl wrk jq python3 openssl; do command -v "$t" >/dev/null || die "missing $t"; done

if [[ -z ${BERTH_BIN:-} ]]; then
  log "building berth (release)"
  (cd "$ROOT" && cargo build --release --quiet) || die "build failed"
  BERTH_BIN=$ROOT/target/release/berth
fi

D=$(mktemp -d /tmp/berth-auth-bench.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then log "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
cat >"$D/config.toml" <<EOF
data_dir = "$D/data"
[[listen]]
addr = "127.0.0.1:$PORT"
[[registry]]
name = "library"
anonymous_pull = true
[webhooks]
allowed_ports = []
EOF
B() { "$BERTH_BIN" --config "$D/config.toml" "$@"; }
B user create bench --admin >/dev/null
KEY=$(B key create bench --json 2>/dev/null)
ID=$(jq -r .id <<<"$KEY"); SECRET=$(jq -r .secret <<<"$KEY")
BASIC="Authorization: Basic $(printf '%s:%s' "$ID" "$SECRET" | base64 -w0)"

RUST_LOG=warn "$BERTH_BIN" serve --config "$D/config.toml" >"$D/out" 2>"$D/err" &
PIDS+=($!)
for _ in $(seq 300); do grep -qx 'berth ready' "$D/out" 2>/dev/null && break; sleep 0.05; done
grep -qx 'berth ready' "$D/out" || die "berth did not start: $(tail -n 5 "$D/err")"

# push_image REPO TAG SEED: a small blob and an OCI manifest by tag; prints the seconds it took
push_image() {
  local repo=$1 tag=$2 seed=$3 blob digest size manifest t0 t1 code
  blob="$D/blob-$seed"; printf 'layer %s' "$seed" >"$blob"
  digest="sha256:$(openssl dgst -sha256 -r "$blob" | cut -d' ' -f1)"; size=$(stat -c %s "$blob")
  manifest=$(jq -cn --arg d "$digest" --argjson s "$size" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $d, size: $s},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $d, size: $s}]}')
  t0=$EPOCHREALTIME
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H "$BASIC" -X POST --data-binary "@$blob" \
    -H 'Content-Type: application/octet-stream' "$URL/v2/$repo/blobs/uploads/?digest=$digest")
  [[ $code == 201 ]] || die "blob push -> $code"
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H "$BASIC" -X PUT --data-binary "$manifest" \
    -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' "$URL/v2/$repo/manifests/$tag")
  [[ $code == 201 ]] || die "manifest push -> $code"
  t1=$EPOCHREALTIME
  awk -v a="${t0/,/.}" -v b="${t1/,/.}" 'BEGIN { printf "%.3f\n", (b - a) * 1000 }'
}

# wrk_rps URL [HEADER]: "req/s p99_ms non2xx"
wrk_rps() {
  local out args=(-t"$WRK_THREADS" -c"$WRK_CONNS" -d"$WRK_DURATION" --latency --timeout 5s
    -H 'Accept: application/vnd.oci.image.manifest.v1+json')
  [[ -n ${2:-} ]] && args+=(-H "$2")
  out=$(wrk "${args[@]}" "$1") || die "wrk $1 failed"
  awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    $1 == "99%" { p99 = ms($2) } /^Requests\/sec:/ { rps = $2 } /Non-2xx/ { bad = $NF }
    END { printf "%.0f %.3f %d\n", rps, p99, bad + 0 }' <<<"$out"
}

median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
p99() { sort -g | awk '{ a[NR] = $1 } END { i = int(NR * 0.99 + 0.999); print a[i] }'; }

push_image library/app v1 first >/dev/null
TOKEN=$(curl -sS -H "$BASIC" "$URL/service/token?service=berth&scope=repository:library/app:pull" | jq -r .token)
MANIFEST="$URL/v2/library/app/manifests/v1"
[[ $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$MANIFEST") == 200 ]] || die "token GET failed"

log "manifest GET by tag (wrk, $WRK_CONNS connections, $WRK_DURATION each)"
read -r anon_rps anon_p99 anon_bad < <(wrk_rps "$MANIFEST")
read -r bearer_rps bearer_p99 bearer_bad < <(wrk_rps "$MANIFEST" "Authorization: Bearer $TOKEN")
read -r basic_rps basic_p99 basic_bad < <(wrk_rps "$MANIFEST" "$BASIC")
log "token issuance"
read -r tok_rps tok_p99 tok_bad < <(wrk_rps "$URL/service/token?service=berth&scope=repository:library/app:pull,push" "$BASIC")
read -r atok_rps atok_p99 atok_bad < <(wrk_rps "$URL/service/token?service=berth&scope=repository:library/app:pull")

log "push latency: $PUSHES pushes without a webhook"
for i in $(seq "$PUSHES"); do push_image library/plain "t$i" "plain$i"; done >"$D/push-plain"

# A receiver that takes 2 s per delivery.
RPORT=$(free_port)
cat >"$D/slow.py" <<'EOF'
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(2)
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
python3 "$D/slow.py" "$RPORT" & PIDS+=($!)
code=$(curl -sS -o "$D/hook" -w '%{http_code}' -H "$BASIC" -H 'Content-Type: application/json' \
  -d "{\"name\":\"slow\",\"events\":[\"PUSH_ARTIFACT\",\"CREATE_TAG\"],\"target\":\"http://127.0.0.1:$RPORT/hook\",\"kind\":\"http\",\"secret\":\"s\"}" \
  "$URL/api/v1/registries/library/webhooks")
[[ $code == 201 ]] || die "webhook create -> $code $(cat "$D/hook")"
log "push latency: $PUSHES pushes with a webhook whose receiver sleeps 2 s"
for i in $(seq "$PUSHES"); do push_image library/hooked "t$i" "hooked$i"; done >"$D/push-hooked"
queued=$(curl -s "$URL/metrics" | awk '/^berth_webhook_queue_depth/ { print $2 }')

printf '\n%-52s %12s %10s %8s\n' "row" "value" "p99 ms" "non-2xx"
printf '%-52s %12s %10s %8s\n' "manifest GET, anonymous (anonymous_pull) req/s" "$anon_rps" "$anon_p99" "$anon_bad"
printf '%-52s %12s %10s %8s\n' "manifest GET, bearer token req/s" "$bearer_rps" "$bearer_p99" "$bearer_bad"
printf '%-52s %12s %10s %8s\n' "manifest GET, Basic access key req/s" "$basic_rps" "$basic_p99" "$basic_bad"
printf '%-52s %12s\n' "  bearer / anonymous" "$(awk "BEGIN { printf \"%.2f\", $bearer_rps / $anon_rps }")x"
printf '%-52s %12s\n' "  basic / anonymous" "$(awk "BEGIN { printf \"%.2f\", $basic_rps / $anon_rps }")x"
printf '%-52s %12s %10s %8s\n' "token issuance, access key req/s" "$tok_rps" "$tok_p99" "$tok_bad"
printf '%-52s %12s %10s %8s\n' "token issuance, anonymous req/s" "$atok_rps" "$atok_p99" "$atok_bad"
printf '%-52s %12s %10s\n' "push (blob+manifest) no webhook, median ms" "$(median <"$D/push-plain")" "$(p99 <"$D/push-plain")"
printf '%-52s %12s %10s\n' "push (blob+manifest) slow webhook, median ms" "$(median <"$D/push-hooked")" "$(p99 <"$D/push-hooked")"
printf '%-52s %12s\n' "  deliveries still queued after the pushes" "${queued:-?}"
