#!/usr/bin/env bash
# test.sh - the project's test command: installs test dependencies, then runs every test.
# Network-namespace tests need root; without it they print "SKIP: ..." (or fail under CI=true).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never
bash scripts/install-test-deps.sh
# netns tests may run in parallel: every topology has its own unique name prefix
exec cargo nextest run --no-fail-fast --test-threads 2 "$@"
