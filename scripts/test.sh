#!/usr/bin/env bash
# Run the test suite (tiny random models, no hub, a few minutes on 2 CPU cores).
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
