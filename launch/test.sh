#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; real DeepSpeed, peft, bitsandbytes, launches).
#   bash launch/test.sh [pytest args]          e.g. -m "not slow", or tests/test_config.py
# One pytest worker per logical CPU (pytest-xdist `-n logical`; TEST_WORKERS=N to change), each test file
# on one worker (its module fixtures are built once). Not `nproc`: it counts OMP_NUM_THREADS.
# Every process the tests start computes with one thread: the tiny models gain nothing from a second
# one, and the two workers then share the cores instead of spinning against each other.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${TEST_WORKERS:-logical}" --dist loadfile --no-loadscope-reorder "$@"
