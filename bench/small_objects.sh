#!/usr/bin/env bash
# Cold sequential reads of many small objects, read whole, in id order, by
# one reader with one request outstanding (a training job walking a data
# set of small files): shardstore with --prefetch off against auto. With
# auto the loadgen marks its reads as going on into the next chunk id, so
# the shard reads the following objects ahead (see shard/src/prefetch.rs).
# The server is restarted before every run (empty cache); off and auto runs
# alternate; medians of RUNS.
#
#   bench/small_objects.sh [WORKDIR]   (default target/bench-small; not tmpfs)
# Env: RUNS=3 KEYS=20000 SIZE=16k SERVER_CPU=1 CLIENT_CPU=0
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-target/bench-small}
RUNS=${RUNS:-3}
KEYS=${KEYS:-20000}
SIZE=${SIZE:-16k}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cargo build --release -q --locked -p shardstore-server -p shardstore-loadgen
BIN=target/release/shardstore
LG=target/release/shardstore-loadgen

SRV=""
start_server() { # serve flags...
  rm -f "$WORK/ready"
  taskset -c "$SERVER_CPU" "$BIN" serve --listen 127.0.0.1:0 --shards 1 --data-dir "$WORK/data" \
    --capacity-mib 2048 --cache-mib 256 --io-memory-kib 1024 --ready-file "$WORK/ready" "$@" \
    2>>"$WORK/server.log" &
  SRV=$!
  for _ in $(seq 1 3000); do [ -s "$WORK/ready" ] && break; sleep 0.01; done
  [ -s "$WORK/ready" ] || { echo "server did not start" >&2; tail "$WORK/server.log" >&2; exit 1; }
  ADDR=$(cat "$WORK/ready")
}
stop_server() { [ -z "$SRV" ] || { kill "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; SRV=""; }; }
trap stop_server EXIT
lg() { taskset -c "$CLIENT_CPU" "$LG" --addr "$ADDR" -q --threads 1 --keys "$KEYS" --size "$SIZE" "$@"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

rm -rf "$WORK/data"
start_server
lg --preload --read-ratio read-only --ops 1 --warmup 0s >/dev/null
stop_server

echo "# $(date -u +%FT%TZ) $KEYS objects of $SIZE, read whole in id order, QD1, cold cache, runs=$RUNS"
: >"$WORK/off"; : >"$WORK/auto"
for r in $(seq 1 "$RUNS"); do
  for pf in off auto; do
    start_server --prefetch "$pf"
    lg --read-ratio read-only --distribution sequential --connections 1 --pipeline 1 \
       --ops "$KEYS" --warmup 0s --json "$WORK/run.json" >/dev/null
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["ops"]["read"]; print(round(r["ops_per_s"]), round(r["latency_us"]["p50"]))' \
      "$WORK/run.json" >>"$WORK/$pf"
    stop_server
  done
done
for pf in off auto; do
  echo "prefetch $pf: median $(cut -d' ' -f1 "$WORK/$pf" | median) objects/s, p50 $(cut -d' ' -f2 "$WORK/$pf" | median) us" \
       "(per run: $(cut -d' ' -f1 "$WORK/$pf" | tr '\n' ' '))"
done
rm -rf "$WORK/data"
