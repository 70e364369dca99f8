"""The pretraining loop: build the run from its config, then step, log, checkpoint (DINOv3 ``train.py``).

``pretrain(cfg, data_dir, run_dir)`` runs one stage. Under ``torchrun`` it trains with DDP (one process per
GPU, or gloo on CPU); the global batch is ``train.batch_size_per_gpu`` times the number of processes, and a
run with the same global batch gives the same result whatever the number of processes (the samples, masks,
Sinkhorn-Knopp normalisation and KoLeo neighbours are all taken over the global batch).
"""
from __future__ import annotations

import collections
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write_text
from ..backbones import create_backbone, load_backbone
from ..errors import DinomedError
from ..events import EventWriter
from ..runtime import DistInfo, StopRequest, init_distributed
from ..training import (check_finite_loss, check_run_folder, gather_rng_states, restore_rng_states, seed_everything,
                        wrap_ddp)
from . import checkpoint as ckpt
from .config import dump_config
from .crops import MultiCropAugmentation, MultiCropConfig
from .data import MultiCropCollator, MultiCropSliceDataset, SliceSource, StepBatchSampler, scan_volume_folder
from .heads import DINOHead
from .meta_arch import SSLMetaArch, build_heads
from .schedules import lr_scale, schedule_from_config
from ..backbones.forward import add_mask_token

log = logging.getLogger(__name__)
STATUS_FILE = "status.json"  # the run at its last checkpoint, for front-ends (no torch needed to read it)


# ---------------------------------------------------------------------------------------------------------
# distributed


def _all_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


# ---------------------------------------------------------------------------------------------------------
# models


def _heads_from_teacher(cfg: dict, embed_dim: int, teacher: dict) -> tuple[DINOHead, DINOHead] | None:
    dino, ibot = build_heads(cfg, embed_dim)
    for name, head in (("dino_head", dino), ("ibot_head", ibot)):
        state = {k[len(name) + 1:]: v for k, v in teacher.items() if k.startswith(name + ".")}
        own = head.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            log.warning("the %s of the initial checkpoint does not fit the config; starting it from scratch", name)
            continue
        head.load_state_dict(state)
    return dino, ibot


def build_meta_arch(cfg: dict) -> SSLMetaArch:
    """Student/teacher from scratch, from a natural-image backbone (``student.pretrained``) or from an earlier
    stage's teacher (``student.init_from``); the Gram teacher from ``gram.ckpt``."""
    s = cfg["student"]
    resolutions = MultiCropConfig.from_config(cfg["crops"]).resolutions()
    size = resolutions[0][0]  # DINOv3 ViTs take any multiple of the patch size; this only sets the default
    student = create_backbone(s["arch"], in_chans=int(s["in_chans"]), img_size=size,
                              drop_path_rate=float(s["drop_path_rate"]), init_values=float(s["layerscale"]))
    heads = None
    mask_token = None
    source = s.get("init_from") or s.get("pretrained")
    if s.get("init_from") and s.get("pretrained"):
        raise DinomedError("config: set student.init_from (an earlier stage) or student.pretrained (a backbone), not both")
    if source:
        path = ckpt.teacher_checkpoint_path(source, "student.init_from" if s.get("init_from") else "student.pretrained")
        loaded = load_backbone(path, arch=s["arch"], in_chans=int(s["in_chans"]), img_size=size)
        student.load_state_dict(loaded.state_dict())
        log.info("student and teacher initialised from %s\n%s", path, loaded.load_report.summary())
        if s.get("init_from"):
            teacher = ckpt.read_teacher_dict(path)
            mask_token = teacher.get("backbone.mask_token")
            heads = _heads_from_teacher(cfg, student.embed_dim, teacher) if teacher else None
    add_mask_token(student, mask_token)

    gram_backbone = None
    if cfg["gram"]["use_loss"]:
        path = ckpt.teacher_checkpoint_path(cfg["gram"]["ckpt"], "gram.ckpt")
        gram_backbone = load_backbone(path, in_chans=int(s["in_chans"]), img_size=max(r[2] or size for r in resolutions))
        log.info("Gram teacher from %s\n%s", path, gram_backbone.load_report.summary())
    return SSLMetaArch(cfg, student, gram_backbone, heads)


def param_groups(student: nn.Module, cfg: dict) -> list[dict]:
    """AdamW groups as DINOv3's ``get_params_groups_with_decay``: layer-wise lr decay over the blocks, a smaller lr
    for the patch embedding, no weight decay on biases, norms and LayerScale, a separately scheduled last layer."""
    optim = cfg["optim"]
    depth = len(student.backbone.blocks)
    decay = float(optim["layerwise_decay"])
    groups: dict[tuple, dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        layer = depth + 1
        if name.startswith("backbone."):
            inner = name[len("backbone."):]
            if inner.startswith(("patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed")):
                layer = 0
            elif inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
        lr_mult = decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= float(optim["patch_embed_lr_mult"])
        wd_mult = 0.0 if (name.endswith("bias") or "norm" in name or "gamma" in name) else 1.0
        last = "last_layer" in name
        key = (lr_mult, wd_mult, last)
        group = groups.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": last})
        group["params"].append(param)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------
# schedules


@dataclass
class Schedules:
    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    local_weight: np.ndarray
    gram_weight: np.ndarray


def build_schedules(cfg: dict, total: int, global_batch: int) -> Schedules:
    epoch = int(cfg["train"]["epoch_length"])
    sch = cfg["schedules"]
    scale = lr_scale(cfg["optim"].get("scaling_rule"), global_batch)
    lr = schedule_from_config(sch["lr"], epoch, total, scale)
    last = lr.copy()
    last[: int(round(float(sch["lr"].get("freeze_last_layer_epochs", 0)) * epoch))] = 0.0
    if cfg["dino"]["reweight_dino_local_loss"]:
        local = schedule_from_config(cfg["dino"]["local_loss_weight_schedule"], epoch, total)
    else:
        local = np.ones(total)
    gram_cfg = cfg["gram"]
    if gram_cfg.get("loss_weight_schedule"):
        gram = schedule_from_config(gram_cfg["loss_weight_schedule"], epoch, total)
    else:
        gram = np.full(total, float(gram_cfg["loss_weight"]))
    return Schedules(lr, last, schedule_from_config(sch["weight_decay"], epoch, total),
                     schedule_from_config(sch["momentum"], epoch, total),
                     schedule_from_config(sch["teacher_temp"], epoch, total), local, gram)


def gram_refresh_due(cfg: dict, iteration: int, done_updates: int) -> bool:
    """DINOv3: after iteration ``it``, refresh when ``it+1 >= first`` and ``(it+1) % frequency == 0``, up to ``max_updates``."""
    g = cfg["gram"]
    if not (g["use_loss"] and g["rep_update"]):
        return False
    epoch = int(cfg["train"]["epoch_length"])
    first = int(round(float(g["first_update_epochs"]) * epoch))
    frequency = max(1, int(round(float(g["update_frequency_epochs"]) * epoch)))
    limit = g.get("max_updates")
    return (iteration + 1) >= first and (iteration + 1) % frequency == 0 and (limit is None or done_updates < int(limit))


# ---------------------------------------------------------------------------------------------------------
# the run


def pretrain(cfg: dict, data_dir: str | Path, run_dir: str | Path, events: EventWriter | None = None,
             resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or continue) one pretraining stage; return a summary (last metrics, skipped files, paths).

    ``stop_after`` ends the run after that many iterations of this call (a checkpoint is written), as if it
    had been interrupted; ``resume=True`` then continues exactly.
    SIGTERM and SIGINT end the run the same way at the next iteration, on every rank at the same iteration
    (``summary["stopped"]``); ``dinomed pretrain`` then exits with :data:`~dinomed.errors.EXIT_STOPPED`.
    """
    events = events or EventWriter(enabled=False, quiet=True)
    run_dir = Path(run_dir)
    env, device = init_distributed(cfg["train"]["device"])
    run_existed = run_dir.exists()
    try:
        with StopRequest() as stop:  # a stop asked for during the set-up takes effect after the first iteration
            return _pretrain(cfg, Path(data_dir), run_dir, events, resume, stop_after, env, device, stop)
    except Exception:
        if env.main and not resume:
            _remove_unstarted_run(run_dir, run_existed)
        raise
    finally:
        if env.initialised_here:
            dist.destroy_process_group()


def _remove_unstarted_run(run_dir: Path, run_existed: bool) -> None:
    """After a failure before the first checkpoint (e.g. a bad ``gram.ckpt``), remove the config.yaml this run
    wrote, and ``run_dir`` itself when this run created it and it is now empty: no folder holding only a config
    is left looking like a run."""
    if (run_dir / ckpt.CHECKPOINT).exists():
        return
    (run_dir / "config.yaml").unlink(missing_ok=True)
    if not run_existed and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _pretrain(cfg, data_dir, run_dir, events, resume, stop_after, env: DistInfo, device: torch.device,
              stop: StopRequest) -> dict:
    train = cfg["train"]
    check_run_folder(run_dir / ckpt.CHECKPOINT, resume, "pretraining run")
    state = ckpt.load_run_checkpoint(run_dir) if resume else None

    scan = scan_volume_folder(data_dir, cfg["modality"])
    data = cfg["data"]
    source = SliceSource(scan, cfg["modality"], data["normalization"], data["body_threshold"],
                         data["empty_slice_weight"], data["cache_volumes"])
    source.check_first_volume()  # fail now, not mid-run, on e.g. a PET that is not in SUV
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        for path, why in scan.skipped:
            events.log(f"skipped unreadable file {path}: {why}")

    seed_everything(int(train["seed"]))
    meta = build_meta_arch(cfg).to(device)
    meta.train()
    local_batch = int(train["batch_size_per_gpu"])
    global_batch = local_batch * env.world_size
    total = int(cfg["optim"]["epochs"]) * int(train["epoch_length"])
    schedules = build_schedules(cfg, total, global_batch)
    optimizer = torch.optim.AdamW(param_groups(meta.student, cfg),
                                  betas=(float(cfg["optim"]["adamw_beta1"]), float(cfg["optim"]["adamw_beta2"])))

    start, gram_updates, unreadable = 0, 0, [why for _, why in scan.skipped]
    if state is not None:
        meta.student.load_state_dict(state["student"])
        meta.teacher.load_state_dict(state["teacher"])
        if meta.gram_teacher is not None and "gram_teacher" in state:
            meta.gram_teacher.load_state_dict(state["gram_teacher"])
        optimizer.load_state_dict(state["optimizer"])
        start, gram_updates = int(state["iteration"]), int(state["gram_updates"])
        unreadable = list(dict.fromkeys(unreadable + list(state.get("unreadable", []))))
        restore_rng_states(state["rng"], env)
        events.log(f"resumed from {run_dir / ckpt.CHECKPOINT} at iteration {start}")

    meta.student_forward = wrap_ddp(meta.student, device, env, broadcast_buffers=False)

    crops = MultiCropConfig.from_config(cfg["crops"])
    dataset = MultiCropSliceDataset(source, MultiCropAugmentation(crops), seed=int(train["seed"]), global_batch=global_batch)
    collate = MultiCropCollator(cfg["ibot"]["mask_ratio_min_max"], cfg["ibot"]["mask_sample_probability"],
                                int(train["seed"]), env.world_size, env.rank)
    workers = int(train["num_workers"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(local_batch, env.world_size, env.rank, start), collate_fn=collate,
        num_workers=workers, persistent_workers=False, pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leaves the global torch RNG (drop-path) untouched, so resume is exact
        prefetch_factor=2 if workers > 0 else None,
    )

    metrics_path = run_dir / "metrics.jsonl"
    last_metrics: dict = {}
    end = total if stop_after is None else min(total, start + int(stop_after))
    epoch_length = int(train["epoch_length"])
    period = int(cfg["checkpointing"]["period"])
    iterator = iter(loader)
    dead_check = int(train.get("dead_start_check") or 0)
    recent_entropy: collections.deque = collections.deque(maxlen=20)
    for it in range(start, end):
        batch = next(iterator)
        for message in batch.pop("unreadable"):
            if message not in unreadable:
                unreadable.append(message)
                events.log(f"skipped unreadable file: {message}")
        tensors = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        for group in optimizer.param_groups:
            # plain floats: the optimizer state is saved in a weights_only checkpoint (no numpy scalars)
            group["weight_decay"] = float(schedules.weight_decay[it]) * group["wd_multiplier"]
            base = schedules.last_layer_lr[it] if group["is_last_layer"] else schedules.lr[it]
            group["lr"] = float(base) * group["lr_multiplier"]
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = meta.forward_backward(tensors, float(schedules.teacher_temp[it]),
                                              float(schedules.local_weight[it]), float(schedules.gram_weight[it]))
        clip = cfg["optim"].get("clip_grad")
        if clip:
            for name in ("backbone", "dino_head", "ibot_head"):
                metrics[f"{name}_grad_norm"] = torch.nn.utils.clip_grad_norm_(
                    getattr(meta.student, name).parameters(), max_norm=float(clip))
        names = list(metrics)
        values = _all_mean(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).to(device) for k in names]))
        reduced = dict(zip(names, (float(v) for v in values.cpu())))
        check_finite_loss(reduced["loss"], f"iteration {it}", "lower schedules.lr.peak or raise optim.clip_grad, "
                          "then start again or --resume from the last checkpoint")
        optimizer.step()
        meta.update_teacher(float(schedules.momentum[it]))
        if gram_refresh_due(cfg, it, gram_updates):
            meta.refresh_gram_teacher()
            gram_updates += 1
            events.log(f"Gram teacher refreshed from the EMA teacher after iteration {it + 1} ({gram_updates})")

        step = it + 1
        recent_entropy.append(reduced["dino_target_entropy"])
        if env.main and step == dead_check:
            _warn_dead_start(cfg, recent_entropy, step, events)
        if env.main:
            record = {"step": step, "epoch": it // epoch_length, **reduced, "lr": float(schedules.lr[it]),
                      "weight_decay": float(schedules.weight_decay[it]), "momentum": float(schedules.momentum[it]),
                      "teacher_temp": float(schedules.teacher_temp[it])}
            last_metrics = record
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if step % int(train["log_every"]) == 0 or step == end or step == start + 1:
                events.metric(**record)
            events.progress(step, total, "iterations")
        stop_now = step < end and stop.agree(env, device)  # one all-reduce: every rank stops at this step
        if step % period == 0 or step == end or stop_now:
            _save(run_dir, meta, optimizer, step, gram_updates, unreadable, env, cfg, events, total, data_dir)
        if stop_now:
            end = step
            if env.main:
                events.log(f"stopped at iteration {step} ({stop.signal_name}); continue with --resume")
            break

    if env.main:
        events.log(f"{len(unreadable)} unreadable file(s) skipped" if unreadable else "no unreadable files")
    return {"metrics": last_metrics, "unreadable": unreadable, "iterations": end, "total": total,
            "stopped": end < total,
            "checkpoint": str(run_dir / ckpt.CHECKPOINT), "teacher_checkpoint": str(run_dir / ckpt.TEACHER_CHECKPOINT),
            "volumes": len(scan.volumes)}


def _warn_dead_start(cfg: dict, recent_entropy, step: int, events: EventWriter) -> None:
    """Say so when the teacher's DINO targets are still uniform: the run is not learning yet.

    With DINOv3's plain (not weight-normalised) last head layer, initialised at std 0.02, the prototype scores of
    different images differ by ~0.02 or less at the start; at a teacher temperature of 0.04-0.07 the
    Sinkhorn-Knopp targets are then uniform, and a high learning rate drives the student to the uniform
    fixed point before the small differences can grow (seen on phantom runs: see README, Pretraining).
    """
    n_prototypes = int(cfg["dino"]["head_n_prototypes"])
    mean = float(np.mean(list(recent_entropy)))
    if mean > 0.99 * math.log(n_prototypes):
        events.log(
            f"warning: after {step} iterations the teacher's DINO targets are still uniform (mean per-image "
            f"entropy {mean:.3f} nats, log K = {math.log(n_prototypes):.3f}): the losses cannot fall from here. "
            "A lower teacher temperature (schedules.teacher_temp, e.g. 0.02) and a lower peak learning rate "
            "(schedules.lr.peak, e.g. 2e-4) let small runs leave this state; see the README's pretraining section")


def _save(run_dir, meta, optimizer, step, gram_updates, unreadable, env: DistInfo, cfg, events, total: int,
          data_dir) -> None:
    rng = gather_rng_states(env)  # every process's RNG streams (drop-path) are kept, rank-indexed
    if not env.main:
        return
    payload = {
        "iteration": step, "gram_updates": gram_updates, "unreadable": list(unreadable), "rng": rng,
        "student": meta.student.state_dict(), "teacher": meta.teacher.state_dict(),
        "optimizer": optimizer.state_dict(), "config": dump_config(cfg),
    }
    if meta.gram_teacher is not None:
        payload["gram_teacher"] = meta.gram_teacher.state_dict()
    path = ckpt.save_run_checkpoint(run_dir, payload)
    teacher_path = ckpt.save_teacher_checkpoint(run_dir, meta.teacher, step)
    atomic_write_text(run_dir / STATUS_FILE, json.dumps({
        "format": "dinomed-run-status/1", "kind": "pretrain", "stage": int(cfg["stage"]), "step": step,
        "total": total, "finished": step >= total, "config": str((run_dir / "config.yaml").resolve()),
        "data": str(Path(data_dir).resolve()), "modality": cfg["modality"], "arch": cfg["student"]["arch"]}, indent=1))
    events.artifact("checkpoint", str(path), step=step)
    events.artifact("teacher_checkpoint", str(teacher_path), step=step)
