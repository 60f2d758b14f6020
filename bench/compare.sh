#!/usr/bin/env bash
# Peer comparison in one run, on this machine.
#
# shardstore (one shard pinned to SERVER_CPU) against its peers on the same
# core: redis-server for in-memory GETs, fio on the same filesystem for the
# disk limit, iperf3 over loopback for the network limit. The load
# generators (shardstore-loadgen, redis-benchmark, the iperf3 client) run on
# CLIENT_CPU. Every figure is the median of RUNS runs. Prints the table
#   workload | shardstore | peer | ratio | notes
# and writes it to $BENCH_DIR/compare.md, raw per-run figures included.
#
# Usage: bash bench/compare.sh            (about 5 minutes with the defaults)
# Env:   RUNS=3 DUR=5 SERVER_CPU=1 CLIENT_CPU=0 BENCH_DIR=target/bench
#        REDIS_N=600000 (GETs per redis-benchmark run)
#        SHARDSTORE_BIN=path  use this server binary instead of building one
#        (e.g. while the work tree does not build); the loadgen is still built
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNS=${RUNS:-3}
DUR=${DUR:-5}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
REDIS_N=${REDIS_N:-600000}
REDIS_PORT=${REDIS_PORT:-6399}
IPERF_PORT=${IPERF_PORT:-5299}
LG=$ROOT/target/release/shardstore-loadgen
SS=${SHARDSTORE_BIN:-$ROOT/target/release/shardstore}

log() { printf '== %s (%s)\n' "$*" "$(date +%T)" >&2; }
die() { echo "compare.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- setup
need=()
for t in fio redis-server redis-benchmark iperf3 python3 taskset; do
    command -v "$t" >/dev/null || need+=("$t")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio redis-server redis-tools iperf3 python3 util-linux >/dev/null
fi
ulimit -l unlimited 2>/dev/null || true

mkdir -p "$BENCH_DIR"
fstype=$(df -T "$BENCH_DIR" | awk 'NR==2 {print $2}')
[[ $fstype != tmpfs ]] || die "$BENCH_DIR is on tmpfs: O_DIRECT needs a real filesystem (set BENCH_DIR)"

log "building (release)"
if [[ -n ${SHARDSTORE_BIN:-} ]]; then
    cargo build --release --locked -p shardstore-loadgen >&2
else
    cargo build --release --locked -p shardstore-loadgen -p shardstore-server >&2
fi
[[ -x $SS ]] || die "no server binary at $SS"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

clk_tck=$(getconf CLK_TCK)
# CPU ticks (user + system) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

py() { python3 -c "$@"; }
median() { py 'import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
jget() { py 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$1" "$2"; }
fmt() { py 'import sys; x = float(sys.argv[1]); print(f"{x:,.0f}" if x >= 100 else f"{x:.1f}")' "$1"; }
ratio() { py 'import sys; a, b = map(float, sys.argv[1:]); print(f"{a / b:.2f}" if b else "n/a")' "$1" "$2"; }

# ---------------------------------------------------------------- servers
SS_DIR=$BENCH_DIR/shardstore
rm -rf "$SS_DIR"
mkdir -p "$SS_DIR"
log "starting shardstore on cpu $SERVER_CPU"
taskset -c "$SERVER_CPU" "$SS" serve --listen 127.0.0.1:0 --data-dir "$SS_DIR/data" --shards 1 \
    --capacity-mib 2048 --io-memory-kib 1024 --ready-file "$SS_DIR/ready" 2>"$SS_DIR/server.log" &
SS_PID=$!
PIDS+=("$SS_PID")
for _ in $(seq 300); do [[ -s $SS_DIR/ready ]] && break; sleep 0.1; done
[[ -s $SS_DIR/ready ]] || die "shardstore did not start: $(tail -5 "$SS_DIR/server.log")"
ADDR=$(cat "$SS_DIR/ready")

log "starting redis-server on cpu $SERVER_CPU"
taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --save '' --appendonly no \
    --bind 127.0.0.1 >"$BENCH_DIR/redis.log" 2>&1 &
PIDS+=("$!")
taskset -c "$SERVER_CPU" iperf3 -s -p "$IPERF_PORT" >"$BENCH_DIR/iperf3-server.log" 2>&1 &
PIDS+=("$!")
sleep 1

# shardstore-loadgen on the client core; the report goes to $1.
lg() {
    local json=$1
    shift
    taskset -c "$CLIENT_CPU" "$LG" --addr "$ADDR" -q --threads 1 --json "$json" "$@" >"$json.txt" 2>&1 ||
        die "loadgen failed ($*): $(tail -5 "$json.txt")"
}

# Data sets: 4 KiB values (keys 0..20000) and 1 MiB values (keys 1e6..1e6+256).
K4="--keys 20000 --size 4k"
K1M="--key-offset 1000000 --keys 256 --size 1m"
log "preloading shardstore"
lg "$BENCH_DIR/preload-4k.json" $K4 --preload --read-ratio read-only --duration 1s --warmup 0s
lg "$BENCH_DIR/preload-1m.json" $K1M --preload --read-ratio read-only --duration 1s --warmup 0s \
    --connections 1 --pipeline 4
log "preloading redis"
taskset -c "$CLIENT_CPU" redis-benchmark -p "$REDIS_PORT" -t set -d 4096 -r 20000 -n 200000 -c 32 -P 16 -q >/dev/null

FIO_FILE=$BENCH_DIR/fio.dat
fio_run() { # fio_run JSON_OUT fio-args... -> prints nothing; JSON in $1
    local out=$1
    shift
    taskset -c "$SERVER_CPU" fio --name=peer --filename="$FIO_FILE" --size=512M --direct=1 \
        --runtime="$DUR" --time_based --ramp_time=1 --output-format=json --output="$out" "$@" >/dev/null
}
log "laying out the fio file"
taskset -c "$SERVER_CPU" fio --name=layout --filename="$FIO_FILE" --size=512M --rw=write --bs=1m \
    --direct=1 --output-format=json --output="$BENCH_DIR/fio-layout.json" >/dev/null

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
RAW=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 |"); }

# --------------------------------------------------- 4 KiB cached GET-equivalent
log "4 KiB GET-equivalent: shardstore"
ss=()
busy=()
cpuop=()
p99=()
for i in $(seq "$RUNS"); do
    t0=$(cpu_ticks "$SS_PID")
    j=$BENCH_DIR/get-$i.json
    lg "$j" $K4 --read-ratio read-only --connections 32 --pipeline 16 --duration "${DUR}s" --warmup 1s
    t1=$(cpu_ticks "$SS_PID")
    ss+=("$(jget "$j" 'd["ops"]["read"]["ops_per_s"]')")
    # Server core busy over warmup + run.
    busy+=("$(py "print(100 * ($t1 - $t0) / $clk_tck / ($DUR + 1))")")
    cpuop+=("$(jget "$j" 'd["client"]["cpu_us_per_op"]')")
    p99+=("$(jget "$j" 'd["ops"]["read"]["latency_us"]["p99"]')")
done
log "4 KiB GET: redis-server"
rd=()
for i in $(seq "$RUNS"); do
    out=$(taskset -c "$CLIENT_CPU" redis-benchmark -p "$REDIS_PORT" -t get -d 4096 -r 20000 \
        -n "$REDIS_N" -c 32 -P 16 --csv | tail -1)
    rd+=("$(echo "$out" | cut -d, -f2 | tr -d '"')")
done
a=$(median "${ss[@]}") b=$(median "${rd[@]}")
row "4 KiB GET-equivalent, 32 conns x 16 pipelined (ops/s)" "$(fmt "$a")" "$(fmt "$b") (redis GET)" "$(ratio "$a" "$b")" \
    "no server cache yet: every shardstore read goes to disk (O_DIRECT); server core $(fmt "$(median "${busy[@]}")")% busy, loadgen $(median "${cpuop[@]}" | xargs printf '%.2f') us CPU/op, p99 $(fmt "$(median "${p99[@]}")") us"
RAW+=("GET shardstore: ${ss[*]} | redis: ${rd[*]} | server busy %: ${busy[*]} | loadgen us/op: ${cpuop[*]}")

# ------------------------------------------------------ 4 KiB durable writes
for qd in 1 32; do
    if ((qd == 1)); then conns=1 pipe=1 fioargs=(--ioengine=io_uring --iodepth=1 --fdatasync=1)
    else conns=4 pipe=8 fioargs=(--ioengine=io_uring --iodepth=32 --fdatasync=1); fi
    log "4 KiB durable write QD$qd: shardstore"
    ss=()
    p99=()
    for i in $(seq "$RUNS"); do
        j=$BENCH_DIR/write-qd$qd-$i.json
        lg "$j" $K4 --read-ratio write-only --connections $conns --pipeline $pipe --duration "${DUR}s" --warmup 1s
        ss+=("$(jget "$j" 'd["ops"]["write"]["ops_per_s"]')")
        p99+=("$(jget "$j" 'd["ops"]["write"]["latency_us"]["p99"]')")
    done
    log "4 KiB durable write QD$qd: fio"
    fo=()
    for i in $(seq "$RUNS"); do
        j=$BENCH_DIR/fio-write-qd$qd-$i.json
        fio_run "$j" --rw=randwrite --bs=4k "${fioargs[@]}"
        fo+=("$(jget "$j" 'd["jobs"][0]["write"]["iops"]')")
    done
    a=$(median "${ss[@]}") b=$(median "${fo[@]}")
    row "4 KiB durable write QD$qd (ops/s)" "$(fmt "$a")" "$(fmt "$b") (fio randwrite ${fioargs[*]})" "$(ratio "$a" "$b")" \
        "shardstore p99 $(fmt "$(median "${p99[@]}")") us"
    RAW+=("write QD$qd shardstore: ${ss[*]} | fio: ${fo[*]}")
done

# -------------------------------------------------- 4 KiB random read QD32
log "4 KiB random read QD32: shardstore"
ss=()
p99=()
for i in $(seq "$RUNS"); do
    j=$BENCH_DIR/randread-$i.json
    lg "$j" $K4 --read-ratio read-only --connections 4 --pipeline 8 --duration "${DUR}s" --warmup 1s
    ss+=("$(jget "$j" 'd["ops"]["read"]["ops_per_s"]')")
    p99+=("$(jget "$j" 'd["ops"]["read"]["latency_us"]["p99"]')")
done
log "4 KiB random read QD32: fio"
fo=()
for i in $(seq "$RUNS"); do
    j=$BENCH_DIR/fio-randread-$i.json
    fio_run "$j" --rw=randread --bs=4k --ioengine=io_uring --iodepth=32
    fo+=("$(jget "$j" 'd["jobs"][0]["read"]["iops"]')")
done
a=$(median "${ss[@]}") b=$(median "${fo[@]}")
row "4 KiB uncached random read QD32 (ops/s)" "$(fmt "$a")" "$(fmt "$b") (fio randread io_uring QD32)" "$(ratio "$a" "$b")" \
    "shardstore p99 $(fmt "$(median "${p99[@]}")") us"
RAW+=("randread shardstore: ${ss[*]} | fio: ${fo[*]}")

# ------------------------------------------------- 1 MiB sequential read
log "1 MiB sequential read: shardstore"
ss=()
for i in $(seq "$RUNS"); do
    j=$BENCH_DIR/seqread-$i.json
    lg "$j" $K1M --read-ratio read-only --distribution sequential --connections 1 --pipeline 4 \
        --duration "${DUR}s" --warmup 1s
    ss+=("$(jget "$j" 'd["ops"]["read"]["mb_per_s"]')")
done
log "1 MiB sequential read: fio"
fo=()
for i in $(seq "$RUNS"); do
    j=$BENCH_DIR/fio-seqread-$i.json
    fio_run "$j" --rw=read --bs=1m --ioengine=io_uring --iodepth=4
    fo+=("$(jget "$j" 'd["jobs"][0]["read"]["bw_bytes"] / 1e6')")
done
log "loopback: iperf3"
ip=()
for i in $(seq "$RUNS"); do
    j=$BENCH_DIR/iperf3-$i.json
    taskset -c "$CLIENT_CPU" iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t "$DUR" -J >"$j"
    ip+=("$(jget "$j" 'd["end"]["sum_received"]["bits_per_second"] / 8e6')")
done
a=$(median "${ss[@]}") b=$(median "${fo[@]}") c=$(median "${ip[@]}")
row "1 MiB sequential read, 4 outstanding (MB/s)" "$(fmt "$a")" "$(fmt "$b") (fio read 1 MiB QD4)" "$(ratio "$a" "$b")" "disk limit"
row "1 MiB sequential read vs loopback (MB/s)" "$(fmt "$a")" "$(fmt "$c") (iperf3 1 stream)" "$(ratio "$a" "$c")" "network limit"
RAW+=("seqread MB/s shardstore: ${ss[*]} | fio: ${fo[*]} | iperf3: ${ip[*]}")

# ---------------------------------------------------------------- report
{
    echo "shardstore vs peers, $(date -u +%Y-%m-%dT%H:%MZ), medians of $RUNS runs of ${DUR}s"
    echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $fstype on $(df "$BENCH_DIR" | awk 'NR==2 {print $1}'), kernel $(uname -r)"
    echo "servers on cpu $SERVER_CPU, load generators on cpu $CLIENT_CPU; load average before the run: $LOAD_BEFORE (other work on the machine skews figures)"
    echo
    echo "| workload | shardstore | peer | ratio | notes |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "raw runs:"
    printf -- '- %s\n' "${RAW[@]}"
} | tee "$BENCH_DIR/compare.md"
