#!/usr/bin/env bash
# The RDMA transport across a real (virtual) wire: two Soft-RoCE VMs joined by
# ../shared/softroce/softroce-pair.sh, examples/rdma_pair_check.rs in each (server in
# VM 1, checks in VM 2). Three boots: equal MTUs (echo, a killed server, connects
# during an 8 s outage leave the server's accept going, the link down for good while
# idle), the server's link at RoCE MTU 1024 against the client's 4096 (echo up to the
# maximum message, killed, the link down for good during traffic), then the other way
# round (echo, killed, the server process stopped with SIGSTOP while idle: the
# keepalive notices; a 3 s outage during traffic: survived, or both sides fail in
# bounded time, never one waiting; last, since a QP failed by the outage leaves new
# RDMA-CM connections to that host unanswered in these VMs). Where the link goes
# down for good, both sides must fail in bounded time (the server checks its own).
# Each boot also runs the seed example (connect, send, recv, return) across the wire.
# A fourth boot runs netperf across the wire (TCP and RDMA, perftest beside it).
# Every wait in the check is bounded; the measured times are in the log.
set -euo pipefail
cd "$(dirname "$0")/.."
pair=../shared/softroce/softroce-pair.sh
[ -x "$pair" ] || { echo "rdma-pair: $pair not found (the CI checkout has ../shared beside it)" >&2; exit 1; }
cargo build --features rdma --example rdma_pair_check --example rdma_seed
cargo build --release --features rdma --example netperf
bin="$PWD/target/debug/examples/rdma_pair_check"
seed="$PWD/target/debug/examples/rdma_seed"
netperf="$PWD/target/release/examples/netperf"

# The GID index of rxe1's RoCE v2 IPv4 address (198.18.1.N), for perftest.
cat > target/pair-gid.sh <<'GUEST'
for g in /sys/class/infiniband/rxe1/ports/1/gids/*; do
  i=${g##*/}
  t=$(cat /sys/class/infiniband/rxe1/ports/1/gid_attrs/types/$i 2>/dev/null)
  case "$(cat $g)" in *ffff:c612*) [ "$t" = "RoCE v2" ] && { echo $i; exit; } ;; esac
done
echo 1
GUEST
# netperf across the wire: both transports, perftest's ib_send_lat/bw on the same pair.
cat > target/netperf-server.sh <<GUEST
#!/bin/sh
eval "\$PAIR_SETUP"
gid=\$(sh target/pair-gid.sh)
"$netperf" --transport tcp --serve "\$PAIR_IP:18800" &
timeout 600 "$netperf" --transport rdma --serve "\$PAIR_IP:18700" --perftest "rxe1:\$gid" --sizes 64,4096
wait
GUEST
cat > target/netperf-client.sh <<GUEST
#!/bin/sh
eval "\$PAIR_SETUP"
gid=\$(sh target/pair-gid.sh)
rc=0
sleep 5
timeout 300 "$netperf" --transport tcp --addr "\$PAIR_PEER_IP:18800" --remote --sizes 64,4096,65536 --duration-ms 300 || rc=1
timeout 420 "$netperf" --transport rdma --addr "\$PAIR_PEER_IP:18700" --remote --perftest "rxe1:\$gid" --sizes 64,4096 || rc=1
exit \$rc
GUEST
chmod +x target/netperf-server.sh target/netperf-client.sh

cat > target/pair-server.sh <<GUEST
#!/bin/sh
eval "\$PAIR_SETUP"
rc=0
for run in \$(seq "\$1"); do
  timeout 300 "$bin" serve "\$PAIR_IP:18515" || rc=1
done
exit \$rc
GUEST
cat > target/pair-client.sh <<GUEST
#!/bin/sh
eval "\$PAIR_SETUP"
shift
rc=0
first=\$1; shift
timeout 400 "$bin" check "\$PAIR_PEER_IP:18515" "\$first" || rc=1
# The seed example (connect, send, recv, return) across the wire.
out=\$(timeout 60 "$seed" "\$PAIR_PEER_IP:18515") || rc=1
echo "pair seed example said: \$out"
[ "\$out" = "got 4 bytes" ] || rc=1
timeout 400 "$bin" check "\$PAIR_PEER_IP:18515" "\$@" || rc=1
exit \$rc
GUEST
chmod +x target/pair-server.sh target/pair-client.sh

rc=0
run() { # MTU_1 MTU_2 SERVER_RUNS CASES...
  local m1=$1 m2=$2 runs=$3; shift 3
  local out; out=$(mktemp -d -t net-rs-pair.XXXXXX)
  echo "rdma-pair: server MTU $m1, client MTU $m2: $*"
  if PAIR_MTU_1=$m1 PAIR_MTU_2=$m2 OUT_BASE=$out "$pair" -t 600 "$PWD" \
      target/pair-server.sh target/pair-client.sh "$runs" "$@"; then
    :
  else
    rc=1
  fi
  grep -h "pair " "$out/vm1/console.log" "$out/vm2/console.log" || true
}
# A link that was down for about 15 s with traffic in flight keeps refusing new
# RDMA-CM connections afterwards in these VMs (rdma-core's ucmatose too; TCP works),
# so each boot takes the link down for good at most once, as its last case.
run 1500 1500 2 echo killed stale idle
run 1500 9000 2 echo killed linkdown
run 9000 1500 4 echo killed stopped stopped-nokeepalive outage
echo "rdma-pair: netperf across the wire (TCP, RDMA and perftest; ratios, no targets)"
out=$(mktemp -d -t net-rs-pair.XXXXXX)
OUT_BASE=$out "$pair" -t 900 "$PWD" target/netperf-server.sh target/netperf-client.sh || rc=1
sed -n '/^netperf:/,/^SOFTROCE_EXIT/p' "$out/vm2/console.log" | grep -v '^SOFTROCE_EXIT'
exit $rc
