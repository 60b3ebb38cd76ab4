#!/usr/bin/env bash
# The test command: everything a fresh machine needs to pass the project's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests signal the sidecar with kill(1) (procps); install it on a machine without it.
if ! command -v /usr/bin/kill >/dev/null 2>&1 && ! command -v /bin/kill >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq procps
fi

# The generated Prometheus rules are checked with Debian's promtool (package prometheus).
if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus
fi

# Unit, integration and doc tests of every crate (paused-clock tests run in memory).
cargo test --workspace

# Loom models of the hand-written synchronisation (circuit breaker state word, bulkhead semaphore). Built with
# `--cfg envelope_loom` in a target directory of their own, so they never invalidate the main build.
RUSTFLAGS="--cfg envelope_loom" CARGO_TARGET_DIR=target/loom cargo test -p envelope-core --lib loom_model
