#!/usr/bin/env bash
# The bundled demo models (Resources/Models/), and the mission in miniature: pretrain -> finetune -> evaluate, on a
# laptop CPU in under an hour (measured: Resources/Models/README.md). Synthetic phantoms only.
#
#   scripts/train_demo_models.sh WORK_DIR
#
#   1. phantoms (`dinomed phantom --variety wide`: body and organ sizes and positions, HU/SUV levels, noise,
#      spacing 0.7-4 mm, slices 1-5 mm, field of view, 0-12 lesions of 4-45 mm at lower contrast):
#        unlabeled  seeds 5000-5047  CT and PET volumes for pretraining (labels never read)
#        train      seeds 1000-1047  labeled, for finetuning (the trainer holds out 20% to pick the best step)
#        heldout    seeds 9000-9009  wide, never seen: the headline figures
#        standard   seeds 9500-9505  the standard generator (as the bundled sample), never seen
#   2. `dinomed pretrain ct_demo` and `pet_demo`: one DINOv3 ViT (width 64, depth 4) per modality, side by side
#   3. `dinomed finetune demo` (Dual-DINOv3: the two encoders fused by cross-attention) from the pretrained
#      encoders, and the same finetuning from random encoders, side by side (one core each, the same budget);
#      then `dinomed finetune demo_ct_organs` (MedDINOv3-style, CT encoder) on both cores
#   4. `dinomed evaluate` of each model on both held-out sets (metrics written beside each model), and
#      WORK_DIR/summary.md: the tables of Resources/Models/README.md and the README.
#
# Environment:
#   PYTHON          the Python with dinomed (default: python)
#   PRETRAIN_S      wall seconds for the two pretraining runs (default 720); they stop cleanly (checkpoint kept)
#   FINETUNE_S      wall seconds of training for the PET/CT pair (default 1080; train.max_seconds)
#   ORGANS_S        wall seconds of training for the CT organ model (default 540)
#   QUICK=1         a smoke run: tiny data, a few steps of each stage (the test, tests/test_train_demo_script.py)
# Extra arguments are finetuning overrides for both recipes (key=value), e.g. train.batch_size=32 on a GPU.
# Every stage skips what is already there, so a stopped script can be run again on the same WORK_DIR.
set -euo pipefail
work=${1:?usage: train_demo_models.sh WORK_DIR [key=value ...]}
shift
py=${PYTHON:-python}
mkdir -p "$work"
work=$(cd "$work" && pwd)
log="$work/timings.txt"
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$log"; }
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

if [ "${QUICK:-0}" = 1 ]; then
    shape=24,48,48; n_unlabeled=2; n_train=4; n_heldout=1; n_standard=1; std_shape=24,48,48
    PRETRAIN_S=${PRETRAIN_S:-600}; FINETUNE_S=${FINETUNE_S:-600}; ORGANS_S=${ORGANS_S:-600}
    pre_args=(optim.epochs=1 train.epoch_length=3 train.batch_size_per_gpu=4 crops.local_crops_number=2)
    ft_args=(train.max_steps=3 train.val_every=3 train.log_every=1 train.batch_size=2 data.patch_size=[32,32]
             data.max_val_cases=1 'preprocessing.target_spacing=[6.0,6.0,null]')
else
    shape=96,256,256; n_unlabeled=48; n_train=48; n_heldout=10; n_standard=6; std_shape=64,128,128
    PRETRAIN_S=${PRETRAIN_S:-720}; FINETUNE_S=${FINETUNE_S:-1080}; ORGANS_S=${ORGANS_S:-540}
    pre_args=(); ft_args=()
fi
ft_args+=("$@")

# ---- 1. phantoms ------------------------------------------------------------------------------------------
phantoms() {  # name seed count variety shape
    [ -f "$work/$1/dataset.json" ] || $py -m dinomed phantom --out "$work/$1" --seed "$2" --cases "$3" --variety "$4" --shape "$5"
}
stamp "phantoms"
( phantoms unlabeled 5000 $n_unlabeled wide $shape; phantoms heldout 9000 $n_heldout wide $shape ) &
( phantoms train 1000 $n_train wide $shape; phantoms standard 9500 $n_standard standard $std_shape ) &
wait
for mod in ct:0000 pet:0001; do  # the pretraining folders: the unlabeled CT (PET) volumes alone
    dir="$work/unlabeled_${mod%%:*}"
    mkdir -p "$dir"
    for f in "$work"/unlabeled/imagesTr/*_"${mod##*:}".nii.gz; do ln -sf "$f" "$dir/"; done
done
stamp "phantoms done ($(elapsed) s)"

# ---- 2. pretraining ----------------------------------------------------------------------------------------
pretrain() {  # modality
    local run="$work/pretrain/$1"
    [ -f "$run/teacher_checkpoint.pth" ] && [ -f "$run/.budget_done" ] && return 0
    local resume=(); [ -f "$run/checkpoint.pth" ] && resume=(--resume)
    # the budget ends the run with a checkpoint (SIGTERM: exit 3 from dinomed, 124 from timeout)
    local rc=0
    OMP_NUM_THREADS=1 timeout --signal=TERM "$PRETRAIN_S" $py -m dinomed pretrain "${1}_demo" "${pre_args[@]}" \
        --data "$work/unlabeled_$1" --out "$run" "${resume[@]}" > "$work/pretrain_$1.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 3 ]; then echo "pretrain $1 failed ($rc): see $work/pretrain_$1.log" >&2; return $rc; fi
    touch "$run/.budget_done"
}
stamp "pretraining CT and PET encoders (${PRETRAIN_S} s)"
pretrain ct & p1=$!
pretrain pet & p2=$!
wait $p1; wait $p2
stamp "pretraining done ($(elapsed) s): $(grep -h '"step"' "$work"/pretrain/ct/status.json | tr -d ' ,') (CT), $(grep -h '"step"' "$work"/pretrain/pet/status.json | tr -d ' ,') (PET)"
ct_ckpt="$work/pretrain/ct/teacher_checkpoint.pth"
pet_ckpt="$work/pretrain/pet/teacher_checkpoint.pth"

# ---- 3. finetuning -----------------------------------------------------------------------------------------
finetune() {  # recipe out threads seconds [key=value ...]
    local recipe=$1 name=$2 threads=$3 seconds=$4; shift 4
    local out="$work/models/$name"
    [ -f "$out/model.json" ] && return 0
    OMP_NUM_THREADS=$threads $py -m dinomed finetune "$recipe" "$@" train.max_seconds="$seconds" "${ft_args[@]}" \
        --data "$work/train" --out "$out" > "$work/finetune_$name.log" 2>&1 \
        || { echo "finetune $name failed: see $work/finetune_$name.log" >&2; return 1; }
}
stamp "finetuning the PET/CT model from the pretrained encoders and from random ones (${FINETUNE_S} s each)"
finetune demo demo 1 "$FINETUNE_S" model.ct_backbone_checkpoint="$ct_ckpt" model.pet_backbone_checkpoint="$pet_ckpt" & f1=$!
finetune demo demo_random_init 1 "$FINETUNE_S" & f2=$!
wait $f1; wait $f2
stamp "finetuning the CT organ model (${ORGANS_S} s)"
finetune demo_ct_organs demo_ct_organs 2 "$ORGANS_S" model.backbone_checkpoint="$ct_ckpt"
stamp "finetuning done ($(elapsed) s)"

# ---- 4. evaluation -----------------------------------------------------------------------------------------
evaluate() {  # model set
    local out="$work/models/$1/eval_$2.csv"
    [ -f "$out" ] || OMP_NUM_THREADS=1 $py -m dinomed evaluate --model "$work/models/$1" --data "$work/$2" \
        --size-thresholds-ml 0.5,5 --out "$out" > "$work/evaluate_$1_$2.log" 2>&1 \
        || { echo "evaluate $1 on $2 failed: see $work/evaluate_$1_$2.log" >&2; return 1; }
}
stamp "evaluating on the held-out phantoms"
( evaluate demo heldout; evaluate demo standard; evaluate demo_ct_organs standard ) & e1=$!
( evaluate demo_random_init heldout; evaluate demo_random_init standard; evaluate demo_ct_organs heldout ) & e2=$!
wait $e1; wait $e2
stamp "done ($(elapsed) s)"
$py "$(dirname "${BASH_SOURCE[0]}")/demo_models_summary.py" "$work" | tee "$work/summary.md"
