#!/bin/bash
# Foreground uncached 4 KiB random reads (QD32) with the scrubber off and with a short scrub period.
cd "$(dirname "$0")/.."
for period in 0 5 0 5; do
  pkill -f "data-dir /var/tmp/scrub/data"; sleep 0.3
  if [ ! -d /var/tmp/scrub/data ]; then FRESH=1; fi
  rm -f /var/tmp/scrub/ready; mkdir -p /var/tmp/scrub
  taskset -c 1 ./target/release/shardstore serve --listen 127.0.0.1:0 --data-dir /var/tmp/scrub/data --shards 1 --capacity-mib 1024 --cache-mib 0 --scrub-period-secs $period --ready-file /var/tmp/scrub/ready > /var/tmp/scrub/log 2>&1 &
  for i in $(seq 100); do [ -s /var/tmp/scrub/ready ] && break; sleep 0.2; done
  A=$(cat /var/tmp/scrub/ready)
  LG="taskset -c 0 ./target/release/shardstore-loadgen --addr $A -q --keys 20000 --size 4k --read-ratio read-only --connections 4 --pipeline 8"
  [ -n "$FRESH" ] && $LG --preload --duration 1s --warmup 0s > /dev/null 2>&1 && FRESH=
  sleep 2
  for r in 1 2; do $LG --duration 4s --warmup 1s 2>&1 | grep "^read" | sed "s/^/scrub_period=$period /"; done
  ./target/release/shardstore stats --addr $A 2>/dev/null | sed -n 2p | awk -v p=$period '{print "scrub_period=" p " scrub passes/errors " $19}'
done
pkill -f "data-dir /var/tmp/scrub/data"
