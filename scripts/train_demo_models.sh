#!/usr/bin/env bash
# Reproduces the bundled demo models in Resources/Models/ from synthetic phantoms only:
#   demo          PET/CT -> lesions + main organs (configs/finetune/demo.yaml)
#   demo_ct_organs CT    -> main organs          (configs/finetune/demo_ct_organs.yaml)
# and measures each on held-out phantoms with `dinomed evaluate`.
#   scripts/train_demo_models.sh WORK_DIR [extra finetune key=value overrides...]
# The committed models were made on one GPU with: scripts/train_demo_models.sh /tmp/demo train.max_steps=4000 train.batch_size=32
# (see Resources/Models/README.md); on a CPU the defaults of the configs take ~20-30 minutes per model.
set -euo pipefail
work=${1:?usage: train_demo_models.sh WORK_DIR [key=value ...]}
shift
py=${PYTHON:-python}
mkdir -p "$work"
[ -f "$work/train/dataset.json" ] || $py -m dinomed phantom --out "$work/train" --seed 1000 --cases 40
[ -f "$work/test/dataset.json" ] || $py -m dinomed phantom --out "$work/test" --seed 9000 --cases 8
for recipe in demo demo_ct_organs; do
    $py -m dinomed finetune "$recipe" "$@" --data "$work/train" --out "$work/models/$recipe"
    $py -m dinomed evaluate --model "$work/models/$recipe" --data "$work/test" --out "$work/models/$recipe/heldout_metrics.csv"
done
