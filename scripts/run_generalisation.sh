#!/usr/bin/env bash
# The cross-dataset experiments (CVC-ClinicDB and Kvasir-SEG) in the background:
#   nohup scripts/run_generalisation.sh > generalisation.log 2>&1 &
# Resumable like scripts/run_grids.sh: start it again in every session and commit
# results/generalisation/cells/ as cells land. The plain SynDiff / baseline pair of
# ClinicDB -> Kvasir-SEG comes first, then its photometric-augmentation pair (the variant meant
# to carry over best), then every other row. DATA_ROOT holds both data sets.
# Side by side, give each one thread (OMP_NUM_THREADS=1): two one-thread trainings on two
# cores do more steps in total than one with both threads (results/speed/two-lanes.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE TQDM_DISABLE=1 HF_HUB_OFFLINE=1
DATA_ROOT=${DATA_ROOT:-../shared/data}
for only in c2k-syndiff,c2k-baseline c2k-syndiff-photometric,c2k-baseline-photometric ""; do
  echo "=== generalisation ${only:-all} $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)"
  .venv/bin/python -m syndiff_lib generalise run --data-root "$DATA_ROOT" --out results/generalisation ${only:+--only "$only"}
done
