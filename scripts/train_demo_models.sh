#!/usr/bin/env bash
# Reproduces the bundled demo models in Resources/Models/ from synthetic phantoms only:
#   demo           PET/CT -> lesions + main organs (configs/finetune/demo.yaml)
#   demo_ct_organs CT     -> main organs          (configs/finetune/demo_ct_organs.yaml)
# and measures each on held-out phantoms (seeds 9000-9007) with `dinomed evaluate`.
#   scripts/train_demo_models.sh WORK_DIR [extra finetune key=value overrides...]
# Environment: PYTHON (default python), PARALLEL=1 trains both models at once (one GPU has room for both),
# TIME_LIMIT=SECONDS stops each training cleanly after that long (the best model so far is kept).
# The exact command behind the committed models is in Resources/Models/README.md.
set -euo pipefail
work=${1:?usage: train_demo_models.sh WORK_DIR [key=value ...]}
shift
py=${PYTHON:-python}
mkdir -p "$work"
[ -f "$work/train/dataset.json" ] || $py -m dinomed phantom --out "$work/train" --seed 1000 --cases 40
[ -f "$work/test/dataset.json" ] || $py -m dinomed phantom --out "$work/test" --seed 9000 --cases 8
train() {
    local recipe=$1; shift
    if [ -n "${TIME_LIMIT:-}" ]; then
        timeout --signal=TERM "$TIME_LIMIT" $py -m dinomed finetune "$recipe" "$@" --data "$work/train" --out "$work/models/$recipe" || [ $? -eq 124 ]
    else
        $py -m dinomed finetune "$recipe" "$@" --data "$work/train" --out "$work/models/$recipe"
    fi
}
if [ "${PARALLEL:-0}" = 1 ]; then
    train demo "$@" > "$work/demo.log" 2>&1 &
    train demo_ct_organs "$@" > "$work/demo_ct_organs.log" 2>&1 &
    wait
else
    train demo "$@"
    train demo_ct_organs "$@"
fi
for recipe in demo demo_ct_organs; do
    $py -m dinomed evaluate --model "$work/models/$recipe" --data "$work/test" --out "$work/models/$recipe/heldout_metrics.csv"
done
