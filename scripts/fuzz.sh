#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time or number of executions, one after the other.
#
#   scripts/fuzz.sh                 # 60 s per target
#   scripts/fuzz.sh 10              # 10 s per target (the smoke run of scripts/test.sh)
#   scripts/fuzz.sh runs 1000000    # 10^6 executions per target
#
# Needs the nightly toolchain (rustup) and cargo-fuzz; installs cargo-fuzz if missing. Each target starts from its
# seeds in fuzz/seeds/<target> and keeps what it finds in fuzz/corpus/<target> (not in git); a crash stops the
# script with the input in fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal

if [ "${1:-}" = "runs" ]; then
    limit="-runs=${2:?how many runs}"
else
    limit="-max_total_time=${1:-60}"
fi
targets=(request_head chunked response config grpc)
cargo +nightly fuzz build -O
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    # -print_final_stats: the execution count is on the last lines (stat::number_of_executed_units).
    if ! cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
        "$limit" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $target FAILED (input in fuzz/artifacts/$target)"
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz: $target: $runs executions, no crash"
done
