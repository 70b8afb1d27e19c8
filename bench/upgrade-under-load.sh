#!/bin/bash
# SIGUSR2 to serve while turnpike-bench relay runs 100 flows at 20k/s per direction
# (issue #21; bench/RESULTS.md). Usage: bench/upgrade-under-load.sh uring|mmsg [--send-indications]
# Needs target/release/turnpike and turnpike-bench (cargo build --release -p turnpike -p turnpike-bench).
cd "$(dirname "$0")/.."
ulimit -n 20000
P=$((40000 + RANDOM % 1000)); M=$((41000 + RANDOM % 1000))
target/release/turnpike serve --listen 127.0.0.1:$P --relay-ports 10000-31999 --user bench:bench --realm bench \
  --allow-peer 127.0.0.0/8 --admin-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:$M --workers 1 --no-pin \
  --user-quota 0 --total-quota 0 --unauth-rate 0 --io-backend $1 > /tmp/turnpike-upgrade-bench.log 2>&1 &
SP=$!
sleep 1.5
(sleep 4; kill -USR2 $SP) &
target/release/turnpike-bench relay --server 127.0.0.1:$P --clients 100 --rate 20000 --duration 8 --warmup 1 $2 2>&1 | tail -12
sleep 1
NEW=$(grep -o "handed over to pid [0-9]*" /tmp/turnpike-upgrade-bench.log | grep -o "[0-9]*$")
echo "old $SP new $NEW"; grep -E "upgrade|took over" /tmp/turnpike-upgrade-bench.log | head -5
curl -s 127.0.0.1:$M/metrics | grep -E "^turnpike_upgrades_total|^turnpike_allocations "
[ -n "$NEW" ] && kill $NEW; kill $SP 2>/dev/null; wait
