"""``dinomed finetune``: train a seed model on a labeled dataset (nnU-Net raw layout); resumable, distributed."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="finetune a segmentation model on a labeled dataset (best model folder + resumable state)",
        description="Train the model of a recipe (a YAML file, or a bundled name: meddinov3, slicewise3d, linear_probe, "
        "dinomed3d_stage1, dinomed3d_stage2, dual_petct, demo, …) on DATASET_DIR (dataset.json, imagesTr/<case>_0000 CT, "
        "_0001 PET, labelsTr/). key=value overrides use dotted keys and YAML values (optim.lr=3e-4, "
        "model.backbone_checkpoint=/ckpt/ct.pth, data.patch_size=[64,64]). Every train.val_every steps the held-out "
        "cases are segmented whole and the best model (by mean Dice) is written to MODEL_DIR (model.json + "
        "model.safetensors); MODEL_DIR/training/state.pt holds the last state for --resume and "
        "MODEL_DIR/training/status.json says how far the run got. SIGTERM or SIGINT (a GUI's Stop, torchrun, a "
        "cluster scheduler, Ctrl-C) stop the run after the current step with the state saved, on every process at "
        "the same step, and the command exits with status 3; continue it with --resume. Under torchrun (or with "
        "--nproc-per-node N) each process trains on its share of the global batch (gloo on CPU, nccl on GPU). "
        "Exit status: 0 done, 2 bad input (one-line error), 3 stopped on request.",
    )
    p.add_argument("config", metavar="CONFIG", help="recipe YAML file or bundled recipe name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys, YAML values)")
    p.add_argument("--data", required=True, metavar="DATASET_DIR", help="labeled dataset folder (nnU-Net raw layout)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output model folder")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in MODEL_DIR exactly")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (one per GPU) through torchrun --standalone")
    p.add_argument("--events", action="store_true", help="JSON-lines events on stdout (progress, metric, artifact, done)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import EXIT_STOPPED
    from ..events import EventWriter
    from ..runtime import relaunch_under_torchrun

    relaunch_under_torchrun(args.nproc_per_node, args.argv)
    from ..finetune import finetune, load_config
    from ..finetune.trainer import command_line

    events = EventWriter(enabled=args.events)
    cfg = load_config(args.config, args.overrides)
    result = finetune(cfg, args.data, args.out, resume=args.resume, events=events, command=command_line())
    if not result.main_process:
        return EXIT_STOPPED if result.stopped else 0
    if result.stopped:
        events.done(step=result.step, stopped=True, best_step=result.best_step, best_dice=result.best_dice)
        return EXIT_STOPPED
    events.log(f"best mean Dice {result.best_dice:.4f} at step {result.best_step}; model folder {result.out_dir}")
    events.done(step=result.step, stopped=False, best_step=result.best_step, best_dice=result.best_dice)
    return 0
