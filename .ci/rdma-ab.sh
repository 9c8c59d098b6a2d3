#!/usr/bin/env bash
# Compare the RDMA benchmark of two commits in the same Soft-RoCE VM boot, their
# `netperf --transport rdma` runs alternating (one run of each per round), so the
# noise of the emulated device falls on both alike. Not part of CI (minutes per round).
#
#   .ci/rdma-ab.sh BASE_COMMIT [ROUNDS] [SIZES]      e.g. .ci/rdma-ab.sh d98a57b 8 64,4096
#
# `new` is the working tree, `old` is BASE_COMMIT (built in a temporary worktree).
# Prints each run's table; summarise the `x ib_send_lat` / `x ib_send_bw` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: .ci/rdma-ab.sh BASE_COMMIT [ROUNDS] [SIZES]}
rounds=${2:-4}
sizes=${3:-64,4096}
vm=../shared/softroce/softroce-vm.sh
[ -x "$vm" ] || { echo "rdma-ab: $vm not found" >&2; exit 1; }

cargo build --release --features rdma --example netperf
mkdir -p target/ab
cp target/release/examples/netperf target/ab/netperf-new
wt=$(mktemp -d)
trap 'git worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$wt" "$base" >/dev/null
old_target="$PWD/target/ab/old-target"
(cd "$wt" && CARGO_TARGET_DIR="$old_target" cargo build --release --features rdma --example netperf)
cp "$old_target/release/examples/netperf" target/ab/netperf-old

cat > target/ab/run.sh <<GUEST
#!/bin/sh
for i in \$(seq 1 $rounds); do
  for v in new old; do
    echo "=== \$v run \$i"
    target/ab/netperf-\$v --transport rdma --addr "\$SOFTROCE_IP:18700" \\
      --perftest "\$SOFTROCE_DEV:\$SOFTROCE_GID_INDEX" --sizes $sizes
  done
done
GUEST
chmod +x target/ab/run.sh
# Nothing else should run beside the VM (its timings are what is measured).
"$vm" -t 1500 "$PWD" target/ab/run.sh
