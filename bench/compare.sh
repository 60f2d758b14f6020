#!/usr/bin/env bash
# Peer comparison of the read path (and durable writes), in one run, on this
# machine.
#
# shardstore (one shard pinned to SERVER_CPU) against its peers on the same
# core; the load generators (shardstore-loadgen, redis-benchmark, the iperf3
# client) run on CLIENT_CPU. Every figure is the median of RUNS runs, and
# each shardstore run is followed by one run of its peer (interleaved, so the
# slow drift of a shared machine hits both sides alike); the ratio is of the
# medians, and the notes list each interleaved pair's ratio. Rows:
#
#  1. Cached 4 KiB random reads, 32 connections x 16 pipelined, vs redis GET
#     (-d 4096 -c 32 -P 16). The 20,000 x 4 KiB set fits in the read cache
#     and is read WARM_PASSES times unmeasured first; the cache hit ratio over
#     the measured runs (from `shardstore stats`) is in the notes, with the
#     server core's busy %.
#  2. Uncached 4 KiB random reads, 32 outstanding (4 x 8), on the same data
#     with the server restarted with --cache-mib 0, vs fio randread 4k
#     O_DIRECT io_uring QD32 on the same filesystem. Target ratio >= 0.85.
#     The notes add fio in lock-step batches of 32 (submit 32, wait for all
#     32): the disk completes bursts together, so a closed loop's requests
#     move in step, and that figure bounds any server behind such a client.
#  3. 1 MiB sequential reads of a cold chunk set (SEQ_CHUNKS x 64 MiB,
#     preloaded in order in 1 MiB pieces by one writer), one connection, one
#     request outstanding (--distribution sequential --io-size 1m), two rows:
#     --prefetch off and auto. The server is restarted before every run
#     (empty cache) and a run reads the set exactly once (--ops), so no byte
#     is read twice. vs fio read 1 MiB O_DIRECT with its default sync engine
#     (QD1), one pass over a file of the same size per run. Target >= 0.9
#     with prefetch; read-ahead counters in the notes.
#  4. Cached 1 MiB random reads, 1 connection x 4 outstanding, of a 64 x
#     1 MiB set (fits in the cache, warmed like row 1), vs one iperf3 stream
#     over loopback, sent by the iperf3 server on SERVER_CPU as shardstore
#     sends its replies (-R), its first second left out (-O 1). Target >= 0.5.
#  5. Durable 4 KiB writes at QD1 and QD32 vs fio randwrite with
#     --fdatasync=1 at the same depth.
#
# A peer run that gives no figure (fio's job error, an empty redis-benchmark
# or iperf3 result) stops the script instead of entering the medians.
#
# Prints the table  workload | shardstore | peer | ratio | notes  and writes
# it to $BENCH_DIR/compare.md, raw per-run figures included. About 5 minutes
# with the defaults.
#
# Usage: bash bench/compare.sh
# Env:   RUNS=3 DUR=5 SERVER_CPU=1 CLIENT_CPU=0 BENCH_DIR=target/bench
#        REDIS_N=600000 (GETs per redis-benchmark run)  SEQ_CHUNKS=16
#        WARM_PASSES=2 (unmeasured read passes before the cached rows: the
#        cache admits a sector to its main queue when it is read again)
#        SERVER_ARGS="--poll-us 200"  extra flags for every shardstore start
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
SEQ_CHUNKS=${SEQ_CHUNKS:-16}
WARM_PASSES=${WARM_PASSES:-2}
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
SS_PID=
cleanup() {
    [[ -z $SS_PID ]] || kill "$SS_PID" 2>/dev/null || true
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

# ---------------------------------------------------------------- shardstore
SS_DIR=$BENCH_DIR/shardstore
rm -rf "$SS_DIR"
mkdir -p "$SS_DIR"

# ss_start [serve flags...]: starts shardstore on SERVER_CPU over the one
# data folder (created on the first start), waits for its ready file; sets
# SS_PID and ADDR.
ss_start() {
    [[ -z $SS_PID ]] || die "ss_start: shardstore already running"
    rm -f "$SS_DIR/ready"
    echo "--- start $* ($(date +%T))" >>"$SS_DIR/server.log"
    taskset -c "$SERVER_CPU" "$SS" serve --listen 127.0.0.1:0 --data-dir "$SS_DIR/data" --shards 1 \
        --capacity-mib 4096 --io-memory-kib 1024 --ready-file "$SS_DIR/ready" ${SERVER_ARGS:-} "$@" 2>>"$SS_DIR/server.log" &
    SS_PID=$!
    for _ in $(seq 600); do
        [[ -s $SS_DIR/ready ]] && break
        kill -0 "$SS_PID" 2>/dev/null || die "shardstore exited at start: $(tail -5 "$SS_DIR/server.log")"
        sleep 0.1
    done
    [[ -s $SS_DIR/ready ]] || die "shardstore not ready after 60 s: $(tail -5 "$SS_DIR/server.log")"
    ADDR=$(cat "$SS_DIR/ready")
}

# ss_stop: SIGTERM (graceful shutdown) and wait for the process to end.
ss_stop() {
    kill -TERM "$SS_PID"
    local rc=0
    wait "$SS_PID" || rc=$?
    SS_PID=
    ((rc == 0)) || die "shardstore exited with status $rc on SIGTERM: $(tail -5 "$SS_DIR/server.log")"
}

# ss_restart [serve flags...]
ss_restart() { ss_stop; ss_start "$@"; }

# Cache counters summed over the shards, from `shardstore stats`:
#   hits misses evicted rd_cached rd_uncach pf_issued pf_used pf_wasted
# (hits..pf_wasted in 4 KiB sectors, rd_* in reads; prefetch "off" is 0).
CACHE_COLS="hits misses evicted rd_cached rd_uncach pf_issued pf_used pf_wasted"
cache_counters() {
    "$SS" stats --addr "$ADDR" | py '
import sys
cols = sys.argv[1].split()
total = dict.fromkeys(cols, 0)
head = None
for line in sys.stdin:
    f = line.split()
    if f[:2] == ["shard", "cache_MiB"]:
        head = f
    elif head and not f:
        break
    elif head:
        row = dict(zip(head, f))
        for c in cols:
            total[c] += int(row[c]) if row[c].isdigit() else 0
if head is None:
    sys.exit("no cache table in shardstore stats")
print(" ".join(str(total[c]) for c in cols))' "$CACHE_COLS"
}

# cache_note BEFORE AFTER: what the cache did between two cache_counters.
cache_note() {
    py '
import sys
cols = sys.argv[1].split()
b, a = (dict(zip(cols, map(int, s.split()))) for s in sys.argv[2:4])
d = {c: a[c] - b[c] for c in cols}
pct = lambda x, y: f"{100 * x / (x + y):.1f}%" if x + y else "-"
mib = lambda s: f"{s * 4096 / 2**20:,.0f}"
out = "cache hits %s of sectors, %s of reads all from cache" % (
    pct(d["hits"], d["misses"]), pct(d["rd_cached"], d["rd_uncach"]))
if d["pf_issued"]:
    out += "; read-ahead MiB issued %s, used %s, wasted %s" % (
        mib(d["pf_issued"]), mib(d["pf_used"]), mib(d["pf_wasted"]))
print(out)' "$CACHE_COLS" "$1" "$2"
}

# cache_add BEFORE AFTER TOTAL: TOTAL plus what the counters moved (sums
# runs of servers restarted in between).
cache_add() { py 'import sys; a, b, t = (s.split() for s in sys.argv[1:]); print(" ".join(str(int(z) + int(y) - int(x)) for x, y, z in zip(a, b, t)))' "$1" "$2" "$3"; }
CACHE_ZERO="0 0 0 0 0 0 0 0"

log "starting shardstore on cpu $SERVER_CPU"
ss_start

log "starting redis-server and iperf3 -s on cpu $SERVER_CPU"
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

# Data sets: 4 KiB values (keys 0..20000), 1 MiB values (keys 1e6..1e6+64),
# 64 MiB chunks written in 1 MiB pieces (keys 2e6..2e6+SEQ_CHUNKS).
K4="--keys 20000 --size 4k"
K1M="--key-offset 1000000 --keys 64 --size 1m"
KSEQ="--key-offset 2000000 --keys $SEQ_CHUNKS --size 64m --io-size 1m"
SEQ_OPS=$((SEQ_CHUNKS * 64))
log "preloading shardstore"
lg "$BENCH_DIR/preload-4k.json" $K4 --preload --read-ratio read-only --ops 1 --warmup 0s
lg "$BENCH_DIR/preload-1m.json" $K1M --preload --read-ratio read-only --ops 1 --warmup 0s \
    --connections 1 --pipeline 4
# One writer, in order, so each chunk's pieces lie on disk in order as fio's
# file does (concurrent writers interleave them).
lg "$BENCH_DIR/preload-seq.json" $KSEQ --preload --read-ratio read-only --ops 1 --warmup 0s \
    --connections 1 --pipeline 1
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
# What was measured: the commit, and files the work tree changes on top.
BUILD="commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{print $2}' | xargs)
[[ -z $dirty ]] || BUILD+=" + uncommitted changes to $dirty"
[[ -z ${SHARDSTORE_BIN:-} ]] || BUILD+=" (server binary $SHARDSTORE_BIN)"
# Rows by number, so the table keeps its order whatever order they run in.
ROWS=()
RAW=()
row() { ROWS[$1]="| $2 | $3 | $4 | $5 | $6 |"; }

# warm KEYS CONNS PIPELINE keyset-flags...: WARM_PASSES unmeasured
# sequential read passes over a key set.
warm() {
    local keys=$1 conns=$2 pipe=$3
    shift 3
    lg "$BENCH_DIR/warm.json" "$@" --read-ratio read-only --distribution sequential \
        --connections "$conns" --pipeline "$pipe" --ops $((keys * WARM_PASSES)) --warmup 0s
}

# measure NAME OP METRIC PEER loadgen-flags...: RUNS shardstore-loadgen runs
# (the flags say how long), each followed by one run of the peer: `PEER I`
# prints the peer's figure for its run I (interleaved, so slow drift of this
# noisy machine hits both sides alike). With RESTART_FLAGS set (an array),
# the server is restarted with them before every run. Sets ss (METRIC of OP,
# per run), peer (the peer's figure, per run), p99 (us), busy (server core %
# busy over the run), cpuop (loadgen CPU us per op) and cache (what the read
# cache did over all runs).
measure() {
    local name=$1 op=$2 metric=$3 peer_run=$4 i j c0 c1 t0 t1 w0 w1 total=$CACHE_ZERO
    shift 4
    ss=() peer=() p99=() busy=() cpuop=() lgbusy=()
    for i in $(seq "$RUNS"); do
        [[ -z ${RESTART_FLAGS+x} ]] || ss_restart "${RESTART_FLAGS[@]}"
        j=$BENCH_DIR/$name-$i.json
        c0=$(cache_counters) t0=$(cpu_ticks "$SS_PID") w0=$(date +%s.%N)
        lg "$j" "$@"
        w1=$(date +%s.%N) t1=$(cpu_ticks "$SS_PID") c1=$(cache_counters)
        total=$(cache_add "$c0" "$c1" "$total")
        ss+=("$(jget "$j" "d['ops']['$op']['$metric']")")
        p99+=("$(jget "$j" "d['ops']['$op']['latency_us']['p99']")")
        cpuop+=("$(jget "$j" 'd["client"]["cpu_us_per_op"]')")
        lgbusy+=("$(jget "$j" '100 * d["client"]["cpu_utilization"]')")
        busy+=("$(py "print(100 * ($t1 - $t0) / $clk_tck / ($w1 - $w0))")")
        peer+=("$(positive "$name peer run $i" "$("$peer_run" "$i")")")
    done
    cache=$(cache_note "$CACHE_ZERO" "$total")
    RAW+=("$name shardstore $op $metric: ${ss[*]} | server busy %: ${busy[*]} | cache counters ($CACHE_COLS): $total")
    RAW+=("$name peer: ${peer[*]}")
}

# positive WHAT VALUE: prints VALUE if it is a number above 0, else stops
# the script: a peer run that failed (fio's job error, an empty redis or
# iperf3 result) must not be taken for a figure (`$(...)` does not stop
# the script on its own).
positive() {
    py 'import sys
try:
    ok = float(sys.argv[2]) > 0
except ValueError:
    ok = False
print(sys.argv[2] if ok else "")' "$1" "$2" | grep . || die "$1 gave no figure (${2:-nothing}): see $BENCH_DIR"
}

# fio_run_get NAME EXPR I fio-flags...: fio run I; prints EXPR of its JSON
# report `d` (nothing if the job reported an error).
fio_run_get() {
    local name=$1 expr=$2 i=$3 j
    shift 3
    j=$BENCH_DIR/fio-$name-$i.json
    fio_run "$j" "$@" || true
    jget "$j" "($expr) if d['jobs'][0]['error'] == 0 else ''"
}

# The ratio of the medians, and the median of the per-run (interleaved
# pair) ratios, from the ss and peer arrays.
ratios() {
    py 'import statistics, sys
n = len(sys.argv) // 2
a, b = [float(x) for x in sys.argv[1:n + 1]], [float(x) for x in sys.argv[n + 1:]]
pairs = [x / y for x, y in zip(a, b) if y]
print(f"{statistics.median(a) / statistics.median(b):.2f}" if statistics.median(b) else "n/a",
      f"{statistics.median(pairs):.2f}" if pairs else "n/a",
      " ".join(f"{r:.2f}" for r in pairs))' "${ss[@]}" "${peer[@]}"
}

# row_measured N WORKLOAD PEER_LABEL NOTE: a row from the last `measure`.
row_measured() {
    local r
    read -r -a r <<<"$(ratios)"
    row "$1" "$2" "$(fmt "$(median "${ss[@]}")")" "$(fmt "$(median "${peer[@]}")") ($3)" "${r[0]}" \
        "$4; ratio of each interleaved pair ${r[*]:2} (median ${r[1]})"
}

p99_note() { echo "p99 $(fmt "$(median "${p99[@]}")") us"; }
TIMED=(--duration "${DUR}s" --warmup 1s)

# ------------------------------------------------ 1. cached 4 KiB random read
log "1. cached 4 KiB random read: shardstore and redis-server, interleaved"
warm 20000 4 8 $K4
redis_get() {
    taskset -c "$CLIENT_CPU" redis-benchmark -p "$REDIS_PORT" -t get -d 4096 -r 20000 \
        -n "$REDIS_N" -c 32 -P 16 --csv | tail -1 | cut -d, -f2 | tr -d '"'
}
measure get read ops_per_s redis_get $K4 --read-ratio read-only --connections 32 --pipeline 16 "${TIMED[@]}"
note="$cache; server core $(fmt "$(median "${busy[@]}")")% busy, loadgen $(median "${cpuop[@]}" | xargs printf '%.2f') us CPU/op ($(fmt "$(median "${lgbusy[@]}")")% of its core), $(p99_note)"
row_measured 1 "4 KiB cached random read, 32 conns x 16 pipelined (ops/s)" "redis GET -c 32 -P 16, runs interleaved" "$note"

# ------------------------------------------------ 4. cached 1 MiB random read
log "4. cached 1 MiB random read: shardstore and iperf3, interleaved"
warm 64 1 4 $K1M
iperf_run() {
    local j=$BENCH_DIR/iperf3-$1.json
    # -R: the server (on SERVER_CPU, like shardstore) sends, as shardstore
    # does; -O 1: the first second left out, like the loadgen's warmup.
    taskset -c "$CLIENT_CPU" iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -R -O 1 -t "$((DUR + 1))" -J >"$j" || true
    jget "$j" 'd["end"]["sum_received"]["bits_per_second"] / 8e6 if "error" not in d else ""'
}
measure read1m read mb_per_s iperf_run $K1M --read-ratio read-only --connections 1 --pipeline 4 "${TIMED[@]}"
row_measured 5 "1 MiB cached random read, 1 conn x 4 outstanding (MB/s)" "iperf3 1 stream, loopback, runs interleaved" \
    "target >= 0.5; $cache; $(p99_note)"

# ------------------------------------------------------ 5. durable writes
for qd in 1 32; do
    if ((qd == 1)); then conns=1 pipe=1; else conns=4 pipe=8; fi
    fioargs=(--ioengine=io_uring --iodepth=$qd --fdatasync=1)
    log "5. 4 KiB durable write QD$qd: shardstore and fio, interleaved"
    fio_write() { fio_run_get write-qd$qd 'd["jobs"][0]["write"]["iops"]' "$1" --rw=randwrite --bs=4k "${fioargs[@]}"; }
    measure write-qd$qd write ops_per_s fio_write $K4 --read-ratio write-only --connections $conns --pipeline $pipe "${TIMED[@]}"
    row_measured $((qd == 1 ? 6 : 7)) "4 KiB durable write QD$qd (ops/s)" "fio randwrite ${fioargs[*]}" "shardstore $(p99_note)"
done

# ---------------------------------------------- 2. uncached 4 KiB random read
log "2. uncached 4 KiB random read QD32: shardstore --cache-mib 0 and fio, interleaved"
ss_restart --cache-mib 0
fio_randread() { fio_run_get randread 'd["jobs"][0]["read"]["iops"]' "$1" --rw=randread --bs=4k --ioengine=io_uring --iodepth=32; }
measure randread read ops_per_s fio_randread $K4 --read-ratio read-only --connections 4 --pipeline 8 "${TIMED[@]}"
# The disk completes a burst of reads together, so a closed loop's 32
# requests travel in step (all at the disk, then all on the network). fio in
# lock-step batches (submit 32, wait for all 32) is that pattern with no
# network at all: the ceiling for any server driven by such a client.
lockstep=()
for i in $(seq "$RUNS"); do
    lockstep+=("$(positive "fio lock-step run $i" "$(fio_run_get randread-lockstep 'd["jobs"][0]["read"]["iops"]' "$i" --rw=randread --bs=4k \
        --ioengine=io_uring --iodepth=32 --iodepth_batch_submit=32 --iodepth_batch_complete_min=32)")")
done
lockstep_note="fio in lock-step batches of 32 (submit 32, wait for all): $(fmt "$(median "${lockstep[@]}")") IOPS, $(py "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$(median "${lockstep[@]}")" "$(median "${peer[@]}")") of fio's"
row_measured 2 "4 KiB uncached random read QD32, 4 conns x 8 (ops/s)" "fio randread io_uring QD32" \
    "target >= 0.85; server --cache-mib 0 ($cache); $(p99_note); $lockstep_note"

# ----------------------------------------- 3. cold 1 MiB sequential read QD1
# fio reads a file the size of shardstore's set once per run, as
# shardstore does (not the 512 MiB file over and over for DUR seconds).
FIO_SEQ_FILE=$BENCH_DIR/fio-seq.dat
taskset -c "$SERVER_CPU" fio --name=layout --filename="$FIO_SEQ_FILE" --size=$((SEQ_CHUNKS * 64))M \
    --rw=write --bs=1m --direct=1 --output-format=json --output="$BENCH_DIR/fio-layout-seq.json" >/dev/null
fio_seqread() {
    local j=$BENCH_DIR/fio-seqread-$pf-$1.json
    taskset -c "$SERVER_CPU" fio --name=peer --filename="$FIO_SEQ_FILE" --size=$((SEQ_CHUNKS * 64))M \
        --direct=1 --rw=read --bs=1m --output-format=json --output="$j" >/dev/null
    jget "$j" 'd["jobs"][0]["read"]["bw_bytes"] / 1e6'
}
for pf in off auto; do
    log "3. cold 1 MiB sequential read QD1, prefetch $pf: shardstore (restarted before each run) and fio, interleaved"
    RESTART_FLAGS=(--prefetch "$pf")
    # One pass over the set per run: every read is of bytes this server
    # process has not read before.
    measure seqread-$pf read mb_per_s fio_seqread $KSEQ --read-ratio read-only --distribution sequential \
        --connections 1 --pipeline 1 --ops "$SEQ_OPS" --warmup 0s
    unset RESTART_FLAGS
    if [[ $pf == off ]]; then n=3 note="$SEQ_CHUNKS x 64 MiB chunks, each run one pass after a restart"
    else n=4 note="target >= 0.9"; fi
    row_measured $n "1 MiB sequential read, cold, QD1, prefetch $pf (MB/s)" "fio read 1 MiB sync QD1, one pass" \
        "$note; $cache; $(p99_note)"
done

# ---------------------------------------------------------------- report
{
    echo "shardstore vs peers, $(date -u +%Y-%m-%dT%H:%MZ), medians of $RUNS runs of ${DUR}s (cold sequential rows: one pass per run), each shardstore run followed by one peer run; ratio = median / median"
    echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $fstype on $(df "$BENCH_DIR" | awk 'NR==2 {print $1}'), kernel $(uname -r)"
    echo "build: $BUILD; extra server flags: ${SERVER_ARGS:-none}"
    echo "servers on cpu $SERVER_CPU, load generators on cpu $CLIENT_CPU; load average before the run: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews figures)"
    echo
    echo "| workload | shardstore | peer | ratio | notes |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "raw runs:"
    printf -- '- %s\n' "${RAW[@]}"
} | tee "$BENCH_DIR/compare.md"
