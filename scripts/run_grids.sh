#!/usr/bin/env bash
# The paper's tables on CVC-ClinicDB in the background:
#   nohup scripts/run_grids.sh > grid.log 2>&1 &
# Fold by fold: every grid's cells of fold 0, then of fold 1, ..., so each fold's autoencoder
# is trained once and shared while it is cached, and every table has its fold-0 row first.
# A killed run resumes where it stopped (done cells are skipped, an interrupted cell resumes
# from its checkpoint), so start it again in every session; commit results/cpu-clinicdb/cells/
# as cells land. DATA, FOLDS and GRIDS may be set: DATA=/path/to/cvc-clinicdb FOLDS="0" GRIDS="table2".
# Two lanes may run at once (a lock per cell keeps them apart); on one fold the second waits
# while the first trains the fold's autoencoder, so give them different folds where there are
# any left: FOLDS="1" nohup scripts/run_grids.sh > grid1.log 2>&1 &
# scripts/run_generalisation.sh runs the cross-dataset experiments beside it.
# Side by side, give each one thread (OMP_NUM_THREADS=1): two one-thread trainings on two
# cores do more steps in total than one with both threads (results/speed/two-lanes.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE TQDM_DISABLE=1 HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data/cvc-clinicdb}
for fold in ${FOLDS:-0 1 2 3 4}; do
  for grid in ${GRIDS:-noise precision table1 table2 table3}; do
    echo "=== $grid fold $fold $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)"
    .venv/bin/python -m syndiff_lib experiment run "$grid" --folds "$fold" --data "$DATA" --out results/cpu-clinicdb
  done
done
