"""``dinomed pretrain CONFIG [key=value …] --data DIR --out RUN_DIR [--events] [--resume]``: DINOv3 pretraining."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="DINOv3 self-supervised pretraining on a folder of unlabeled CT or PET volumes (stages 1-3)",
        description=(
            "Pretrain a DINOv3 ViT on axial slices of unlabeled CT (HU) or PET (SUV) volumes: stage 1 self-distillation "
            "(DINO + iBOT + KoLeo), stage 2 Gram anchoring (gram.ckpt=STAGE1_RUN), stage 3 high-resolution adaptation "
            "(student.init_from=STAGE2_RUN gram.ckpt=STAGE2_RUN). CONFIG is a YAML file or a bundled config name, e.g. "
            "ct_vits_stage1, pet_vitb_stage2, tiny_test (dinomed recipes lists them). Run distributed with "
            "--nproc-per-node N, or torchrun --nproc_per_node=N -m dinomed pretrain …. RUN_DIR/status.json says how far "
            "the run got. SIGTERM or SIGINT (a GUI's Stop, torchrun, a cluster scheduler, Ctrl-C) stop the run at the "
            "next iteration with a checkpoint saved, on every process at the same iteration, and the command exits "
            "with status 3; continue it with --resume. Exit status: 0 done, 2 bad input (one-line error), 3 stopped."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", help="stage config: a YAML file or a bundled name (ct_vits_stage1, …)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. optim.epochs=10 train.batch_size_per_gpu=32")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder of CT or PET volumes (NIfTI, NRRD, MHA, DICOM series)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: config.yaml, checkpoints, metrics.jsonl")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="train on N processes of this machine (one per GPU) through torchrun --standalone")
    parser.add_argument("--events", action="store_true", help="write JSON-lines events on stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import EXIT_STOPPED
    from ..events import EventWriter
    from ..runtime import relaunch_under_torchrun

    relaunch_under_torchrun(args.nproc_per_node, args.argv)
    from ..pretrain import load_config, pretrain

    main_rank = int(os.environ.get("RANK", "0")) == 0
    events = EventWriter(enabled=args.events and main_rank, quiet=not main_rank)
    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg, args.data, args.out, events=events, resume=args.resume)
    if summary.get("metrics"):
        what = "stopped" if summary.get("stopped") else "done"
        events.log(f"stage {cfg['stage']} {what}: {summary['iterations']}/{summary['total']} iterations, "
                   f"loss {summary['metrics'].get('loss', float('nan')):.4f}; teacher: {summary['teacher_checkpoint']}")
    stopped = bool(summary.get("stopped"))
    events.done(run_dir=str(args.out), unreadable_files=len(summary["unreadable"]), stopped=stopped,
                step=summary["iterations"], total=summary["total"])
    return EXIT_STOPPED if stopped else 0
