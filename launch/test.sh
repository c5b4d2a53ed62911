#!/usr/bin/env bash
# Run the test suite (extra arguments go to pytest, e.g. `bash launch/test.sh -k ops`).
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
