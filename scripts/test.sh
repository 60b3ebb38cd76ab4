#!/usr/bin/env bash
# The test command: everything a fresh machine needs to pass the project's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests talk to, installed (one apt run) on a machine without them:
# - procps: the end-to-end tests signal the sidecar with kill(1);
# - prometheus: the generated rules are checked with promtool, and a real Prometheus scrapes the sidecar;
# - chromium, chromium-driver: the dashboard page is driven in headless Chromium through WebDriver;
# - redis-server (with redis-cli): distributed mode's store is tested against a real Redis, and the Python
#   package's tests wrap one in an envelope.
missing=()
command -v /usr/bin/kill >/dev/null 2>&1 || command -v /bin/kill >/dev/null 2>&1 || missing+=(procps)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# No two modules of a crate import each other in a circle.
python3 scripts/module-cycles.py crates/envelope-core/src crates/envelope-http/src crates/envelope-config/src crates/envelope-redis/src crates/envelope-sidecar/src crates/envelope/src crates/envelope-python/src

# Unit, integration and doc tests of every crate (paused-clock tests run in memory).
cargo test --workspace

# The Python package, built from source into a virtualenv of its own (maturin, from PyPI), then its tests: pytest
# and mypy --strict over the package and its tests.
venv=target/python-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "maturin>=1.9,<2" "pytest>=8" "pytest-asyncio>=0.24" "mypy>=1.10" "prometheus-client>=0.20" "fastapi>=0.110" "httpx>=0.27" "uvicorn>=0.30" "redis>=5"
VIRTUAL_ENV="$PWD/$venv" PATH="$PWD/$venv/bin:$PATH" maturin develop -q -m crates/envelope-python/Cargo.toml
(cd crates/envelope-python && "../../$venv/bin/python" -m pytest -q && "../../$venv/bin/python" -m mypy --strict python/envelope tests ../../examples/python)
# And as a newcomer installs it: `pip install` from the repository into a fresh virtualenv (a release build through
# maturin's PEP 517 backend), then a call through an envelope.
fresh=target/python-fresh
rm -rf "$fresh" && python3 -m venv "$fresh"
"$fresh/bin/pip" install -q ./crates/envelope-python
(cd /tmp && "$OLDPWD/$fresh/bin/python" -c 'import envelope; assert envelope.Envelope("e", retry=envelope.Retry(2)).call(lambda: 42) == 42; print("pip install: ok")')

# The fuzz targets (request head, chunked decoder, response reader, config loader, gRPC headers), 10 s each: they build, and the
# seeds and what libFuzzer finds in that time cross every parser without a crash. Longer runs: scripts/fuzz.sh.
./scripts/fuzz.sh 10

# Loom models of the hand-written synchronisation (circuit breaker state word, bulkhead semaphore). Built with
# `--cfg envelope_loom` in a target directory of their own, so they never invalidate the main build.
RUSTFLAGS="--cfg envelope_loom" CARGO_TARGET_DIR=target/loom cargo test -p envelope-core --lib loom_model
