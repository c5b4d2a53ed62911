#!/usr/bin/env bash
# Run the test suite (extra arguments go to pytest, e.g. `bash launch/test.sh -k ops`).
set -euo pipefail
. "$(dirname "$0")/env.sh"
# two workers (these CPUs have 2 cores; `-n N` after it overrides, `-n 0` runs in this process)
python -m pytest -q -n 2 --dist worksteal "$@"
