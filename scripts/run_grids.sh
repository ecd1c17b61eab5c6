#!/usr/bin/env bash
# The paper's tables on CVC-ClinicDB, one grid after the other, in the background:
#   nohup scripts/run_grids.sh > grid.log 2>&1 &
# A killed run resumes where it stopped (done cells are skipped, an interrupted cell resumes
# from its checkpoint), so start it again in every session; commit results/cpu-clinicdb/cells/
# as cells land. DATA and GRIDS may be set: DATA=/path/to/cvc-clinicdb GRIDS="table2".
# scripts/run_generalisation.sh runs the cross-dataset experiments beside it.
# Side by side, give each one thread (OMP_NUM_THREADS=1): two one-thread trainings on two
# cores do more steps in total than one with both threads (results/speed/two-lanes.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE TQDM_DISABLE=1 HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data/cvc-clinicdb}
for grid in ${GRIDS:-noise precision table1 table2 table3}; do
  echo "=== $grid $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)"
  .venv/bin/python -m syndiff_lib experiment run "$grid" --data "$DATA" --out results/cpu-clinicdb
done
