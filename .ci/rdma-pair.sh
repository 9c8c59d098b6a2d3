#!/usr/bin/env bash
# The RDMA transport across a real (virtual) wire: two Soft-RoCE VMs joined by
# ../shared/softroce/softroce-pair.sh, examples/rdma_pair_check.rs in each (server in
# VM 1, checks in VM 2). Three boots: equal MTUs (echo, a killed server, a 3 s outage
# survived, the link down for good while idle), the server's link at RoCE MTU 1024
# against the client's 4096 (echo up to the maximum message, killed, the link down for
# good during traffic), then the other way round (echo, killed). Where the link goes
# down for good, both sides must fail in bounded time (the server checks its own).
# Every wait in the check is bounded; the measured times are in the log.
set -euo pipefail
cd "$(dirname "$0")/.."
pair=../shared/softroce/softroce-pair.sh
[ -x "$pair" ] || { echo "rdma-pair: $pair not found (the CI checkout has ../shared beside it)" >&2; exit 1; }
cargo build --features rdma --example rdma_pair_check
bin="$PWD/target/debug/examples/rdma_pair_check"

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
timeout 400 "$bin" check "\$PAIR_PEER_IP:18515" "\$@"
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
run 1500 1500 2 echo killed outage idle
run 1500 9000 2 echo killed linkdown
run 9000 1500 1 echo killed
exit $rc
