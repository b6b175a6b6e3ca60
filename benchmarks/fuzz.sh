#!/usr/bin/env bash
# The long fuzzing run: >= 500 random residual and dense networks through `convert`
# (tests/test_fuzz.py with the hypothesis profile "long"), and >= 500 residual networks of
# the kinds the rewrite cannot see at a glance (tests/test_never_wrong.py: channels-last
# streams, per-channel activations, weight_norm / spectral_norm, lazy modules, branches on
# self.training, scaled shortcuts), with statistics of what each example did (converted,
# or refused with which reason; any wrong model or unclean error fails the run).
#
#     benchmarks/fuzz.sh                  # 500 examples of each
#     benchmarks/fuzz.sh --hypothesis-seed=1
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export HYPOTHESIS_STORAGE_DIRECTORY="${TMPDIR:-/tmp}/cspify-hypothesis"  # failing-example patches go there
exec python -m pytest tests/test_fuzz.py tests/test_never_wrong.py -p no:cacheprovider -q --hypothesis-show-statistics "$@"
