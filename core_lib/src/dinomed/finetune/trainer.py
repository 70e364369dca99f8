"""Supervised finetuning of any seed model on a labeled dataset: the training loop behind ``dinomed finetune``.

One loop for every seed recipe (docs: configs/finetune/*.yaml): patches sampled by case and class
(:mod:`.transforms`), Dice + cross-entropy (``monai.losses.DiceCELoss``), AdamW with a lower learning rate for the
pretrained encoder than for the new layers, linear warm-up then cosine decay, gradient clipping, bf16 autocast on
a GPU. Every ``val_every`` steps the held-out cases are segmented whole (:func:`dinomed.inference.predict.predict_volume`)
and scored per class (Dice, HD95); the best model is written as a model folder. The last state (model, optimiser,
schedule, scaler, RNG, step) is written atomically to ``OUT/training/state.pt`` so that ``--resume`` continues
exactly: the patches of a step depend only on the seed and the step, never on how the run was split.

Distributed data parallel under ``torchrun`` (gloo on CPU, nccl on GPU): rank ``r`` of ``W`` takes its share of
each global batch, gradients are averaged, rank 0 validates and writes.
"""
from __future__ import annotations

import copy
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..errors import CheckpointError, DinomedError
from ..runtime import StopRequest, autocast, autocast_dtype, init_distributed
from ..training import (barrier, check_finite_loss, check_run_folder, gather_rng_states, load_checkpoint, lr_factor,
                        restore_rng_states, save_checkpoint, seed_everything, wrap_ddp)
from ..events import EventWriter
from .config import dump_config
from .dataset import DatasetSpec, load_case, open_dataset, split_cases, validate_dataset
from .metrics import class_metrics, nanmean
from .transforms import PatchDataset, PatchSampler, StepIndices

STATE_DIR = "training"
STATE_FILE = "state.pt"
STATUS_FILE = "status.json"  # the run at its last checkpoint, for front-ends (no torch needed to read it)
# keys that may change between a run and its resumption (they do not change what is computed)
SESSION_KEYS = {("train", "stop_after"), ("train", "num_workers"), ("train", "device"), ("train", "log_every"),
                ("train", "save_every"), ("train", "max_seconds"), ("train", "clock"),
                ("description",)}


@dataclass
class FinetuneResult:
    out_dir: Path
    step: int
    best_step: int | None
    best_dice: float
    stopped: bool
    history: list = field(default_factory=list)
    train_cases: list = field(default_factory=list)
    val_cases: list = field(default_factory=list)
    main_process: bool = True  # False on DDP ranks other than 0 (they do not report)


# ---------------------------------------------------------------------------------------------------------
# model, optimiser, schedule


def architecture_for(cfg: dict, spec: DatasetSpec) -> dict:
    """The model.json ``architecture``: the config's model with ``in_chans`` and ``num_classes`` from inputs and labels."""
    arch = copy.deepcopy(cfg["model"])
    num_classes = spec.labels.num_classes
    if arch.get("num_classes") not in (None, num_classes):
        raise DinomedError(
            f"config model.num_classes is {arch['num_classes']} but the labels give {num_classes} "
            f"(background + {', '.join(spec.labels.names)}); leave num_classes out to have it filled in"
        )
    arch["num_classes"] = num_classes
    arch.setdefault("in_chans", len(cfg["inputs"]))
    return arch


def init_from_model_folder(model: nn.Module, folder: str | Path) -> tuple[int, int]:
    """Copy every tensor of a model folder whose name and shape match (e.g. DINO-Med3D stage II ← best stage I);
    returns (copied, total in the model). Nothing matching is an error."""
    from safetensors.torch import load_file

    from ..models import read_model_json

    folder = Path(folder)
    read_model_json(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"config init_from: {folder} has no model.safetensors")
    source = load_file(str(weights), device="cpu")
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise CheckpointError(
            f"config init_from: no tensor of {weights} fits this model (names or shapes differ everywhere); "
            "is it a model of the same family?"
        )
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


def parameter_groups(model: nn.Module, optim_cfg: dict) -> list[dict]:
    """AdamW groups: pretrained-encoder parameters (names containing a ``backbone_patterns`` part, LoRA excepted) at
    ``lr * backbone_lr_scale``, new layers at ``lr``; no weight decay on biases, norms and tokens (1-D tensors)."""
    lr, scale, wd = float(optim_cfg["lr"]), float(optim_cfg["backbone_lr_scale"]), float(optim_cfg["weight_decay"])
    patterns = list(optim_cfg["backbone_patterns"])
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        pretrained = any(p in name for p in patterns) and "lora_" not in name
        decay = param.ndim > 1 and not name.endswith(".bias")
        groups.setdefault((pretrained, decay), []).append(param)
        names.setdefault((pretrained, decay), []).append(name)
    if not groups:
        raise DinomedError("the model has no trainable parameter (everything is frozen)")
    out = []
    for (pretrained, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * scale if pretrained else lr, "weight_decay": wd if decay else 0.0,
                    "group": ("backbone" if pretrained else "new") + ("" if decay else "_no_decay"),
                    "param_names": names[(pretrained, decay)]})
    return out


def load_state(path: Path) -> dict:
    return load_checkpoint(path, "training state")


def config_differences(saved: dict, current: dict, prefix: tuple = ()) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        path = prefix + (key,)
        if path in SESSION_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, path)
        elif a != b:
            diffs.append(f"{'.'.join(path)}: {a!r} → {b!r}")
    return diffs


# ---------------------------------------------------------------------------------------------------------
# validation


def validate(model: nn.Module, model_json: dict, cases, labels: list[dict], amp) -> dict:
    """Whole-volume Dice and HD95 per class on held-out cases (``predict_volume``, as at inference)."""
    from ..inference.predict import predict_volume

    values = [e["value"] for e in labels]
    per_case = {}
    for case in cases:
        pred = predict_volume(model, model_json, case.image, amp=amp)
        per_case[case.name] = class_metrics(pred, case.label, values, case.spacing)
    result = {"dice": nanmean(nanmean(c[v]["dice"] for c in per_case.values()) for v in values),
              "hd95": nanmean(nanmean(c[v]["hd95"] for c in per_case.values()) for v in values)}
    for entry in labels:
        v = entry["value"]
        result[f"dice_{entry['name']}"] = nanmean(c[v]["dice"] for c in per_case.values())
        result[f"hd95_{entry['name']}"] = nanmean(c[v]["hd95"] for c in per_case.values())
    return result


# ---------------------------------------------------------------------------------------------------------
# the loop


def finetune(cfg: dict, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
             events: EventWriter | None = None, command: str | None = None) -> FinetuneResult:
    """Train ``cfg["model"]`` on the dataset in ``data_dir``; the best model folder goes to ``out_dir``."""
    from monai.losses import DiceCELoss

    from ..models import build_model, model_json_template, save_model_folder
    from ..preprocess import default_spec

    dist_info, device = init_distributed(cfg["train"]["device"])
    events = events if (events is not None and dist_info.main) else EventWriter(enabled=False, quiet=not dist_info.main)
    stop = StopRequest()  # a stop asked for during the set-up takes effect after the first step
    out_existed = Path(out_dir).exists()
    try:
        stop.__enter__()
        out_dir = Path(out_dir)
        state_path = out_dir / STATE_DIR / STATE_FILE
        train_cfg, data_cfg, optim_cfg = cfg["train"], cfg["data"], cfg["optim"]
        check_run_folder(state_path, resume, "training run", out_dir)
        global_batch = int(train_cfg["batch_size"])
        if global_batch % dist_info.world_size:
            raise DinomedError(
                f"config train.batch_size {global_batch} is not divisible by the {dist_info.world_size} processes"
            )

        # --- the data, checked before anything trains ---------------------------------------------------
        spec = open_dataset(data_dir, cfg["inputs"], cfg["labels"], cfg["background_labels"])
        validate_dataset(spec, progress=events.progress)
        train_names, val_names = split_cases(spec.case_names, data_cfg)
        if data_cfg.get("max_val_cases"):
            val_names = val_names[: int(data_cfg["max_val_cases"])]

        # --- the model ---------------------------------------------------------------------------------
        arch = architecture_for(cfg, spec)
        seed = int(train_cfg["seed"])
        torch.manual_seed(seed)
        model = build_model(arch, load_checkpoints=not resume)
        entry = model.model_entry
        if len(data_cfg["patch_size"]) != entry.spatial_dims:
            raise DinomedError(
                f"config data.patch_size {data_cfg['patch_size']} does not fit {entry.name!r}, a {entry.spatial_dims}D model "
                f"(expected {'[H, W]' if entry.spatial_dims == 2 else '[D, H, W]'})"
            )
        if cfg["init_from"] and not resume:
            copied, total = init_from_model_folder(model, cfg["init_from"])
            events.log(f"initialised {copied} of {total} tensors from {cfg['init_from']}")
        pre_cfg = cfg["preprocessing"]
        channel_specs = pre_cfg["channels"] or [default_spec(m) for m in cfg["inputs"]]
        # what dinomed segment needs to see the input as training did: spacing, high-resolution scale, normalisation
        preprocessing = {"target_spacing": pre_cfg["target_spacing"], "input_scale": float(pre_cfg["input_scale"]),
                         "channels": channel_specs}
        inference = dict(cfg["inference"])
        model_json = model_json_template(
            model, name=cfg["name"], labels=spec.labels.entries, inputs=list(cfg["inputs"]),
            preprocessing=preprocessing, inference=inference,
        )
        if entry.spatial_dims == 3 and "roi_size" not in inference:
            model_json["inference"]["roi_size"] = list(data_cfg["patch_size"])
        model.to(device)

        cases_cache: dict = {}

        def load(name: str):
            if name not in cases_cache:
                cases_cache[name] = load_case(spec, spec.case(name), channel_specs, preprocessing)
            return cases_cache[name]

        val_cases = [load(n) for n in val_names] if dist_info.main else []

        groups = parameter_groups(model, optim_cfg)
        betas = tuple(float(b) for b in optim_cfg["betas"])
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], betas=betas)
        max_steps = int(train_cfg["max_steps"])
        warmup_steps = int(optim_cfg["warmup_steps"])
        schedule = optim_cfg["schedule"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup_steps, max_steps,
                                                                           float(optim_cfg["min_lr_ratio"])))
        # plateau: after warm-up the LambdaLR stops and ReduceLROnPlateau owns the learning rate (official DINO-Med3D)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=float(optim_cfg["plateau_factor"]), patience=int(optim_cfg["plateau_patience"]))
        amp = train_cfg["amp"]
        amp_dtype = autocast_dtype(device, amp)  # bf16 only on a GPU that has it
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=bool(cfg["loss"]["batch_dice"]),
                             lambda_dice=float(cfg["loss"]["lambda_dice"]), lambda_ce=float(cfg["loss"]["lambda_ce"]))

        step, best_dice, best_step, history = 0, -math.inf, None, []
        if resume:
            state = load_state(state_path)
            saved_cfg = json.loads(state["config"])
            diffs = config_differences(saved_cfg, cfg)
            if diffs:
                raise DinomedError(f"--resume: the config differs from the interrupted run's ({state_path}): " + "; ".join(diffs))
            if state["train_cases"] != train_names or state["val_cases"] != val_names:
                raise DinomedError(f"--resume: the dataset's training/held-out cases differ from the interrupted run's ({state_path})")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if "plateau" in state:
                plateau.load_state_dict(state["plateau"])
            scaler.load_state_dict(state["scaler"])
            step, best_dice = int(state["step"]), float(state["best_dice"])
            best_step = int(state["best_step"]) if state["best_step"] >= 0 else None
            history = json.loads(state["history"])
            restore_rng_states(state["rng"], dist_info)
            events.log(f"resumed from step {step} ({state_path})")
        else:
            (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True) if dist_info.main else None
            seed_everything(seed)
            torch.manual_seed(seed + dist_info.rank)
        if dist_info.main:
            atomic_write_text(out_dir / STATE_DIR / "config.yaml", dump_config(cfg))

        train_model = wrap_ddp(model, device, dist_info, find_unused_parameters=bool(train_cfg["find_unused_parameters"]))

        sampler = PatchSampler(train_names, load, data_cfg["patch_size"], spec.labels.num_classes, data_cfg,
                               cfg["augment"], seed)
        loader = torch.utils.data.DataLoader(
            PatchDataset(sampler), batch_size=global_batch // dist_info.world_size,
            sampler=StepIndices(step, max_steps, global_batch, dist_info.rank, dist_info.world_size),
            num_workers=int(train_cfg["num_workers"]), pin_memory=device.type == "cuda",
            persistent_workers=False)

        provenance_base = {
            "command": command or "dinomed.finetune.finetune(...)",
            "config": cfg,
            "data": str(Path(data_dir).resolve()),
            "train_cases": train_names,
            "val_cases": val_names,
            "world_size": dist_info.world_size,
        }
        val_every, log_every = int(train_cfg["val_every"]), int(train_cfg["log_every"])
        save_every = int(train_cfg["save_every"] or val_every)
        stop_after = train_cfg["stop_after"]
        events.log(f"finetuning {entry.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                   f"{len(train_names)} training / {len(val_names)} held-out case(s), {dist_info.world_size} process(es), "
                   f"{device}, steps {step}..{max_steps}")

        def state_payload() -> dict:
            rng = gather_rng_states(dist_info)  # a collective under DDP
            return {
                "format": "dinomed-finetune-state/1", "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "plateau": plateau.state_dict(),
                "rng": rng, "best_dice": best_dice, "best_step": -1 if best_step is None else best_step,
                "config": json.dumps(cfg), "history": json.dumps(history),
                "train_cases": train_names, "val_cases": val_names,
            }

        def checkpoint(finished: bool = False) -> None:
            payload = state_payload()  # a collective under DDP: every rank takes part
            if dist_info.main:
                save_checkpoint(state_path, payload)
                atomic_write_text(out_dir / STATE_DIR / "history.json", json.dumps(history, indent=1))
                atomic_write_text(out_dir / STATE_DIR / STATUS_FILE, json.dumps({
                    "format": "dinomed-run-status/1", "kind": "finetune", "name": cfg["name"], "step": step,
                    "total": max_steps, "finished": finished, "best_step": best_step,
                    "best_dice": best_dice if math.isfinite(best_dice) else None,
                    "config": str((out_dir / STATE_DIR / "config.yaml").resolve()),
                    "data": str(Path(data_dir).resolve()), "command": command}, indent=1))

        def run_validation() -> None:
            nonlocal best_dice, best_step
            if dist_info.main:
                started = time.perf_counter()
                scores = validate(model, model_json, val_cases, spec.labels.entries, amp)
                record = {"phase": "val", "step": step, "epoch": sampler.epoch_of(step * global_batch), **scores,
                          "seconds": round(time.perf_counter() - started, 3)}
                history.append(record)
                events.metric(**record)
                score = scores["dice"] if math.isfinite(scores["dice"]) else -1.0
                if schedule == "plateau" and step >= warmup_steps:
                    plateau.step(score)
                if score > best_dice or best_step is None:
                    best_dice, best_step = score, step
                    model_json["provenance"] = {**model_json["provenance"], **provenance_base,
                                                "metrics": {"step": step, **scores}}
                    save_model_folder(model, model_json, out_dir)
                    events.artifact("model", str(out_dir), step=step, dice=scores["dice"])
            barrier(dist_info)

        stopped = False
        start_step = step
        max_seconds = train_cfg["max_seconds"]
        clock = time.process_time if train_cfg["clock"] == "process" else time.perf_counter
        started = clock()
        train_model.train()
        for batch in _batches(loader, step, max_steps):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = train_model(images)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if optim_cfg["grad_clip"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(optim_cfg["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            if schedule != "plateau" or step < warmup_steps:
                scheduler.step()
            step += 1
            loss_value = loss.detach()
            out_of_time = max_seconds is not None and clock() - started >= float(max_seconds)
            # (on this rank's device: nccl reduces GPU tensors only)
            flags = torch.tensor([float(loss_value), float(out_of_time)], dtype=torch.float64, device=device)
            if dist_info.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(flags)
                flags[0] /= dist_info.world_size
            last = step == max_steps or bool(flags[1] > 0)  # the time budget ends the run like its last step
            if not math.isfinite(float(flags[0])):
                saved = (f"the last checkpoint, from before this step, is {state_path}; continue from it with "
                         "--resume and a lower optim.lr=…"
                         if state_path.is_file() else "no checkpoint had been saved yet, so the run folder is removed")
                check_finite_loss(float(flags[0]), f"step {step}", f"lower optim.lr or check the data ({saved})")
            if step % log_every == 0 or last:
                record = {"phase": "train", "step": step, "epoch": sampler.epoch_of((step - 1) * global_batch),
                          "loss": float(flags[0]), "lr": optimizer.param_groups[-1]["lr"],
                          "elapsed": round(clock() - started, 3)}
                history.append(record)
                events.metric(**record)
            events.progress(step, max_steps, "steps")
            if step % val_every == 0 or last:
                run_validation()
            # a stop asked for during this step (or its validation) ends the run here, on every rank
            stop_now = not last and (stop.agree(dist_info, device) or (
                stop_after is not None and start_step < int(stop_after) <= step))
            if step % save_every == 0 or last or stop_now:
                checkpoint(finished=last)
            if last and step < max_steps:
                events.log(f"time budget of {max_seconds} s reached at step {step}")
                break
            if stop_now:
                stopped = True
                events.log(f"stopped at step {step}; continue with --resume")
                break
        return FinetuneResult(out_dir=out_dir, step=step, best_step=best_step, best_dice=best_dice, stopped=stopped,
                              history=history, train_cases=train_names, val_cases=val_names,
                              main_process=dist_info.main)
    except Exception:
        if dist_info.main and not resume:
            remove_unstarted_run(Path(out_dir), out_existed)
        raise
    finally:
        stop.__exit__()
        if dist_info.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def remove_unstarted_run(out_dir: Path, out_existed: bool) -> None:
    """After a failure before the first checkpoint, remove what the run wrote (its config.yaml, the training
    folder, and ``out_dir`` itself when this run created it), so that no folder holding only a config is left
    looking like a run. A run with a checkpoint, or a model folder already saved, is left as it is."""
    import shutil

    state_dir = out_dir / STATE_DIR
    if (state_dir / STATE_FILE).exists() or (out_dir / "model.safetensors").exists():
        return
    for name in ("config.yaml", "history.json"):
        (state_dir / name).unlink(missing_ok=True)
    for folder in (state_dir, out_dir if not out_existed else None):
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def _batches(loader, step: int, max_steps: int):
    if step >= max_steps:
        return
    yield from loader


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["dinomed", *sys.argv[1:]])
