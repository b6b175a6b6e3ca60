#!/usr/bin/env bash
# The long fuzzing run: >= 500 random residual and dense networks through `convert`
# (tests/test_fuzz.py with the hypothesis profile "long"), with statistics of what each
# example did (converted, refused with which reason, or hit a known core bug; with
# CSPIFY_FUZZ_STRICT=1 a known bug fails the run instead).
#
#     benchmarks/fuzz.sh                  # 500 examples
#     benchmarks/fuzz.sh --hypothesis-seed=1
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export HYPOTHESIS_STORAGE_DIRECTORY="${TMPDIR:-/tmp}/cspify-hypothesis"  # failing-example patches go there
exec python -m pytest tests/test_fuzz.py -p no:cacheprovider -q --hypothesis-show-statistics "$@"
