#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; real DeepSpeed, peft, bitsandbytes, launches).
#   bash launch/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest -q "$@" tests
