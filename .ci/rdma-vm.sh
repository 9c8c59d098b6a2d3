#!/usr/bin/env bash
# Build the RDMA device tests on the host and run them in one boot of the Soft-RoCE VM
# (../shared/softroce/softroce-vm.sh: a QEMU guest with a real rxe device). Inside the
# guest NET_RS_RDMA_TESTS=1 makes the tests fail, not skip, without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
vm=../shared/softroce/softroce-vm.sh
[ -x "$vm" ] || { echo "rdma-vm: $vm not found (the CI checkout has ../shared beside it)" >&2; exit 1; }

cargo test --features rdma,async-std,hyper,grpc --tests --no-run --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if exe and m.get("profile", {}).get("test") and "/rdma_" in m.get("target", {}).get("src_path", ""):
        print(exe)
' > target/rdma-tests.txt
[ -s target/rdma-tests.txt ] || { echo "rdma-vm: no rdma test binaries were built" >&2; exit 1; }
cargo build --features rdma --example rdma_echo_server --example rdma_echo_client --example rdma_seed
cargo build --features rdma,async-std,hyper,grpc --example http_echo --example grpc_greeter
cargo build --release --features rdma,grpc --example netperf

cat > target/rdma-run.sh <<'GUEST'
#!/bin/sh
set -u
echo "guest: device ${SOFTROCE_DEV:-?} at ${SOFTROCE_IP:-?}"
rc=0
while read -r t; do
  echo "guest: running $t"
  "$t" --test-threads=1 || rc=1
done < target/rdma-tests.txt
# The examples, as a user runs them: echo server, echo client, the seed example.
ex=target/debug/examples
"$ex/rdma_echo_server" "$SOFTROCE_IP:18515" & srv=$!
sleep 1
"$ex/rdma_echo_client" "$SOFTROCE_IP:18515" || { echo "guest: rdma_echo_client failed"; rc=1; }
out=$("$ex/rdma_seed" "$SOFTROCE_IP:18515") || { echo "guest: rdma_seed failed"; rc=1; }
echo "guest: rdma_seed said: $out"
[ "$out" = "got 4 bytes" ] || { echo "guest: unexpected rdma_seed output"; rc=1; }
kill $srv 2>/dev/null
# HTTP (hyper, under smol) and gRPC (tonic) over RDMA, as a user runs the examples.
timeout 120 "$ex/http_echo" demo --transport rdma --addr "$SOFTROCE_IP:18900" \
  || { echo "guest: http_echo over RDMA failed"; rc=1; }
timeout 120 "$ex/grpc_greeter" demo --transport rdma --addr "$SOFTROCE_IP:18910" \
  || { echo "guest: grpc_greeter over RDMA failed"; rc=1; }
# The benchmark: net-rs over RDMA next to perftest on the same device (ratios only).
target/release/examples/netperf --transport rdma --addr "$SOFTROCE_IP:18700" \
  --perftest "$SOFTROCE_DEV:$SOFTROCE_GID_INDEX" || { echo "guest: netperf rdma failed"; rc=1; }
# The RPC over RDMA (1, 16, 256 in flight) next to the bare round trip. (The shared
# folder is read-only in the guest: the table is kept in a variable, not a file.)
table=$(target/release/examples/netperf --transport rdma --only rpc \
  --addr "$SOFTROCE_IP:18800" --duration-ms 500 2>&1) || { echo "guest: netperf rdma rpc failed"; rc=1; }
echo "$table"
case "$table" in *FAILED*) echo "guest: an RDMA RPC cell failed"; rc=1 ;; esac
# gRPC (tonic) over net-rs RDMA and TCP next to tonic's own TCP and the bare echoes.
table=$(target/release/examples/netperf --transport rdma --only grpc \
  --addr "$SOFTROCE_IP:18950" --duration-ms 500 2>&1) || { echo "guest: netperf grpc failed"; rc=1; }
echo "$table"
case "$table" in *FAILED*) echo "guest: a gRPC cell failed"; rc=1 ;; esac
# Byte streams and TLS over net-rs RDMA next to TCP (a panic fails the run).
target/release/examples/netperf --transport rdma --only stream \
  --addr "$SOFTROCE_IP:19300" --duration-ms 300 || { echo "guest: netperf stream failed"; rc=1; }
exit $rc
GUEST
chmod +x target/rdma-run.sh
"$vm" -t 1800 -e NET_RS_RDMA_TESTS=1 -e RUST_BACKTRACE=1 "$PWD" target/rdma-run.sh
