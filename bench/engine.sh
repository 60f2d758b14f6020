#!/usr/bin/env bash
# Storage engine figures (issue 3, "Measured"), each against fio on the SAME
# filesystem in the same run:
#   1. median acknowledged 4 KiB write latency at QD1 through the client
#      / fio --rw=randwrite --bs=4k --direct=1 --fdatasync=1 --iodepth=1
#   2. durable 4 KiB random write IOPS at 32 outstanding requests
#      / fio ... --fdatasync=1 --iodepth=32 (io_uring)
#   3. recovery time after a SIGKILL with 1 GiB recently written.
# Each figure is the median of RUNS runs (default 3).
#
#   bench/engine.sh [WORKDIR]      WORKDIR: on the filesystem to measure
#                                  (default target/bench-engine; not tmpfs)
# Env: RUNS=3 SECS=10 RECOVERY_GIB=1 SERVER_CPU=0 CLIENT_CPU=1
#      SERVER_ARGS="--poll-us 200"  extra flags for every server start
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-target/bench-engine}
RUNS=${RUNS:-3}
SECS=${SECS:-10}
RECOVERY_GIB=${RECOVERY_GIB:-1}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
command -v fio >/dev/null || { echo "fio missing: apt-get update && apt-get install -y fio" >&2; exit 1; }
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cargo build --release -q -p shardstore-server --bin shardstore --example bench_writes
BIN=target/release/shardstore
BENCH=target/release/examples/bench_writes

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

SRV=""
start_server() { # $1 data dir, rest: extra flags
  local dir=$1; shift
  rm -f "$dir/ready"
  taskset -c "$SERVER_CPU" "$BIN" serve --listen 127.0.0.1:0 --shards 1 --data-dir "$dir" \
    --capacity-mib "${CAPACITY_MIB:-2048}" --ready-file "$dir/ready" ${SERVER_ARGS:-} "$@" 2>>"$dir/server.log" &
  SRV=$!
  for _ in $(seq 1 3000); do [ -s "$dir/ready" ] && break; sleep 0.01; done
  [ -s "$dir/ready" ] || { echo "server did not start" >&2; tail "$dir/server.log" >&2; exit 1; }
  ADDR=$(cat "$dir/ready")
}
stop_server() { kill -9 "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; }
trap stop_server EXIT

fio_run() { # $1 iodepth (file written in full beforehand, see below) -> prints "write+sync_median_us iops"
  fio --name=w --filename="$WORK/fio.dat" --size=1G --rw=randwrite --bs=4k --direct=1 \
      --fdatasync=1 --iodepth="$1" --ioengine=io_uring --runtime="$SECS" --time_based --fallocate=none \
      --cpus_allowed="$SERVER_CPU" --lat_percentiles=1 --output-format=json 2>/dev/null |
  python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; w=j["write"]; \
p=lambda d: d["percentile"]["50.000000"]/1000; \
print(p(w["lat_ns"]) + p(j["sync"]["lat_ns"]), w["iops"])'
}
# fio latency = median write latency + median fdatasync latency (fio reports
# them apart; an acknowledged write of ours includes both). The write's is
# fio's "lat", submission plus completion: with io_uring at QD1 the
# submission (slat, about 20 us here) is where the kernel issues the write,
# so "clat" alone leaves part of the device write out.

# fio's file is written in full first: our data area is zero-filled at
# format, so neither side pays for converting unwritten (fallocated) extents.
if [ ! -s "$WORK/fio.dat" ]; then
  dd if=/dev/zero of="$WORK/fio.dat" bs=1M count=1024 oflag=direct status=none
fi

echo "# $(date -u +%FT%TZ) $(uname -r) fs: $(df -T "$WORK" | awk 'NR==2{print $2" "$1}') runs=$RUNS secs=$SECS server flags: ${SERVER_ARGS:-none}"
for qd in 1 32; do
  : >"$WORK/ss.$qd"; : >"$WORK/fio.$qd"
  for r in $(seq 1 "$RUNS"); do
    D="$WORK/data-qd$qd-$r"; rm -rf "$D"; mkdir -p "$D"
    start_server "$D"
    taskset -c "$CLIENT_CPU" "$BENCH" "$ADDR" "$qd" "$SECS" 4096 256 $((4 << 20)) | tee -a "$WORK/ss.$qd.json" |
      python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(j["lat_us_p50"], j["iops"])' >>"$WORK/ss.$qd"
    stop_server; rm -rf "$D"
    fio_run "$qd" >>"$WORK/fio.$qd"
  done
  ss_lat=$(cut -d' ' -f1 "$WORK/ss.$qd" | median); ss_iops=$(cut -d' ' -f2 "$WORK/ss.$qd" | median)
  fio_lat=$(cut -d' ' -f1 "$WORK/fio.$qd" | median); fio_iops=$(cut -d' ' -f2 "$WORK/fio.$qd" | median)
  echo "QD$qd 4KiB durable writes: shardstore p50 ${ss_lat} us, ${ss_iops} IOPS | fio p50 ${fio_lat} us, ${fio_iops} IOPS" \
       "| latency ratio $(python3 -c "print(round($ss_lat/$fio_lat,3))") | IOPS ratio $(python3 -c "print(round($ss_iops/$fio_iops,3))")"
  echo "  per run (shardstore p50_us iops): $(tr '\n' ';' <"$WORK/ss.$qd")  (fio): $(tr '\n' ';' <"$WORK/fio.$qd")"
done

# Recovery: write RECOVERY_GIB GiB with 1 MiB writes at QD8, SIGKILL right
# away, time the restart until ready and read the shard's own recovery log.
: >"$WORK/rec"
for r in $(seq 1 "$RUNS"); do
  D="$WORK/data-rec-$r"; rm -rf "$D"; mkdir -p "$D"
  start_server "$D"
  # 8 writers x 16 chunks x 64 MiB of random 1 MiB-aligned offsets.
  taskset -c "$CLIENT_CPU" "$BENCH" "$ADDR" 8 3600 $((1 << 20)) 16 $((64 << 20)) $((RECOVERY_GIB << 30)) >/dev/null
  kill -9 "$SRV"; wait "$SRV" 2>/dev/null || true
  t0=$(date +%s.%N)
  start_server "$D"
  t1=$(date +%s.%N)
  rec_us=$(grep -o 'recovery_us=[0-9]*' "$D/server.log" | tail -1 | cut -d= -f2)
  scanned=$(grep -o 'scanned_sectors=[0-9]*' "$D/server.log" | tail -1 | cut -d= -f2)
  replayed=$(grep -o 'replayed_extents=[0-9]*' "$D/server.log" | tail -1 | cut -d= -f2)
  echo "$(python3 -c "print(round(($t1-$t0)*1000))") $((rec_us / 1000)) $scanned $replayed" >>"$WORK/rec"
  stop_server; rm -rf "$D"
done
echo "recovery after SIGKILL with ${RECOVERY_GIB} GiB recently written: restart-to-ready median $(cut -d' ' -f1 "$WORK/rec" | median) ms," \
     "shard recovery median $(cut -d' ' -f2 "$WORK/rec" | median) ms"
echo "  per run (ready_ms recovery_ms scanned_sectors replayed_extents): $(tr '\n' ';' <"$WORK/rec")"
