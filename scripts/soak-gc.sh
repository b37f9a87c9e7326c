#!/usr/bin/env bash
# The GC under fire for many rounds (tests/gc.rs runs 3 in the suite): pushes sharing layers
# with deleted images, pulls through a cache, collections with no grace time, back to back.
#   scripts/soak-gc.sh [ROUNDS]   # default 50
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH_GC_ROUNDS="${1:-50}" exec cargo test --test gc gc_under_fire -- --nocapture
