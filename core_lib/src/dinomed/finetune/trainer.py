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
from ..runtime import DistInfo, StopRequest, autocast, autocast_dtype, init_distributed
from ..training import (barrier, check_finite_loss, check_run_folder, gather_rng_states, load_checkpoint, lr_factor,
                        restore_rng_states, save_checkpoint, seed_everything, wrap_ddp)
from ..events import EventWriter
from .config import dump_config, with_defaults
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
# set-up: data, model, optimisation


@dataclass
class _Split:
    """The dataset (checked) and its training and held-out case names."""

    spec: DatasetSpec
    train_names: list
    val_names: list


def _open_data(cfg: dict, data_dir: str | Path, events: EventWriter) -> _Split:
    """Open and check the dataset before anything trains, then split its cases."""
    spec = open_dataset(data_dir, cfg["inputs"], cfg["labels"], cfg["background_labels"])
    validate_dataset(spec, progress=events.progress)
    train_names, val_names = split_cases(spec.case_names, cfg["data"])
    if cfg["data"].get("max_val_cases"):
        val_names = val_names[: int(cfg["data"]["max_val_cases"])]
    return _Split(spec, train_names, val_names)


def _build_model(cfg: dict, spec: DatasetSpec, resume: bool, events: EventWriter) -> nn.Module:
    """The seeded model for the config and the labels; on a fresh run its pretrained parts and ``init_from``."""
    from ..models import build_model

    torch.manual_seed(int(cfg["train"]["seed"]))
    model = build_model(architecture_for(cfg, spec), load_checkpoints=not resume)
    entry = model.model_entry
    patch_size = cfg["data"]["patch_size"]
    if len(patch_size) != entry.spatial_dims:
        raise DinomedError(
            f"config data.patch_size {patch_size} does not fit {entry.name!r}, a {entry.spatial_dims}D model "
            f"(expected {'[H, W]' if entry.spatial_dims == 2 else '[D, H, W]'})"
        )
    if cfg["init_from"] and not resume:
        copied, total = init_from_model_folder(model, cfg["init_from"])
        events.log(f"initialised {copied} of {total} tensors from {cfg['init_from']}")
    return model


def _input_preprocessing(cfg: dict) -> tuple[list, dict]:
    """The channels' normalisation and what ``dinomed segment`` needs to see the input as training did
    (spacing, high-resolution scale, normalisation)."""
    from ..preprocess import default_spec

    pre_cfg = cfg["preprocessing"]
    channel_specs = pre_cfg["channels"] or [default_spec(m) for m in cfg["inputs"]]
    preprocessing = {"target_spacing": pre_cfg["target_spacing"], "input_scale": float(pre_cfg["input_scale"]),
                     "channels": channel_specs}
    return channel_specs, preprocessing


def _model_json(cfg: dict, model: nn.Module, spec: DatasetSpec, preprocessing: dict) -> dict:
    """The model.json written with every best model (its provenance is filled in at each save)."""
    from ..models import model_json_template

    inference = dict(cfg["inference"])
    model_json = model_json_template(
        model, name=cfg["name"], labels=spec.labels.entries, inputs=list(cfg["inputs"]),
        preprocessing=preprocessing, inference=inference,
    )
    if model.model_entry.spatial_dims == 3 and "roi_size" not in inference:
        model_json["inference"]["roi_size"] = list(cfg["data"]["patch_size"])
    return model_json


class _CaseCache:
    """Cases read (and preprocessed) once, on first use, for the patch sampler and validation."""

    def __init__(self, spec: DatasetSpec, channel_specs: list, preprocessing: dict):
        self.spec, self.channel_specs, self.preprocessing = spec, channel_specs, preprocessing
        self.cases: dict = {}

    def __call__(self, name: str):
        if name not in self.cases:
            self.cases[name] = load_case(self.spec, self.spec.case(name), self.channel_specs, self.preprocessing)
        return self.cases[name]


@dataclass
class _Optimisation:
    """AdamW, its schedule (a LambdaLR; under ``plateau`` a ReduceLROnPlateau after warm-up), scaler and loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None
    schedule: str
    warmup_steps: int

    def plateau_owns_lr(self, step: int) -> bool:
        """After warm-up the LambdaLR stops and ReduceLROnPlateau owns the learning rate (official DINO-Med3D)."""
        return self.schedule == "plateau" and step >= self.warmup_steps


def _make_optimisation(model: nn.Module, cfg: dict, device: torch.device) -> _Optimisation:
    from monai.losses import DiceCELoss

    optim_cfg, max_steps = cfg["optim"], int(cfg["train"]["max_steps"])
    groups = parameter_groups(model, optim_cfg)
    betas = tuple(float(b) for b in optim_cfg["betas"])
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], betas=betas)
    warmup_steps = int(optim_cfg["warmup_steps"])
    schedule = optim_cfg["schedule"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup_steps, max_steps,
                                                                       float(optim_cfg["min_lr_ratio"])))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=float(optim_cfg["plateau_factor"]), patience=int(optim_cfg["plateau_patience"]))
    amp_dtype = autocast_dtype(device, cfg["train"]["amp"])  # bf16 only on a GPU that has it
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_cfg = cfg["loss"]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=bool(loss_cfg["batch_dice"]),
                         lambda_dice=float(loss_cfg["lambda_dice"]), lambda_ce=float(loss_cfg["lambda_ce"]))
    return _Optimisation(optimizer, scheduler, plateau, scaler, loss_fn, amp_dtype, schedule, warmup_steps)


# ---------------------------------------------------------------------------------------------------------
# the run's state: a fresh start, --resume, checkpoints


@dataclass
class _Progress:
    """What changes as the run goes and is saved in every checkpoint."""

    step: int = 0
    best_dice: float = -math.inf
    best_step: int | None = None
    history: list = field(default_factory=list)


def _start_fresh(out_dir: Path, seed: int, dist_info: DistInfo) -> _Progress:
    if dist_info.main:
        (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    torch.manual_seed(seed + dist_info.rank)
    return _Progress()


def _resume(state_path: Path, cfg: dict, split: _Split, model: nn.Module, opt: _Optimisation, dist_info: DistInfo,
            events: EventWriter) -> _Progress:
    """Check that the interrupted run was this one (config, cases), then restore everything it saved."""
    state = load_state(state_path)
    saved_cfg = with_defaults(json.loads(state["config"]))  # keys added to the defaults since the run was saved
    diffs = config_differences(saved_cfg, cfg)
    if diffs:
        raise DinomedError(f"--resume: the config differs from the interrupted run's ({state_path}): " + "; ".join(diffs))
    if state["train_cases"] != split.train_names or state["val_cases"] != split.val_names:
        raise DinomedError(f"--resume: the dataset's training/held-out cases differ from the interrupted run's ({state_path})")
    model.load_state_dict(state["model"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if "plateau" in state:
        opt.plateau.load_state_dict(state["plateau"])
    opt.scaler.load_state_dict(state["scaler"])
    progress = _Progress(step=int(state["step"]), best_dice=float(state["best_dice"]),
                         best_step=int(state["best_step"]) if state["best_step"] >= 0 else None,
                         history=json.loads(state["history"]))
    restore_rng_states(state["rng"], dist_info)
    events.log(f"resumed from step {progress.step} ({state_path})")
    return progress


# ---------------------------------------------------------------------------------------------------------
# the run: checkpoints, validation, the step loop


@dataclass
class _Run:
    """One finetuning run once set up: what checkpoints, validation and the step loop share."""

    cfg: dict
    data_dir: Path
    out_dir: Path
    command: str | None
    dist_info: DistInfo
    device: torch.device
    events: EventWriter
    split: _Split
    model: nn.Module
    train_model: nn.Module  # ``model`` itself, or its DDP wrapper
    model_json: dict
    val_cases: list
    opt: _Optimisation
    progress: _Progress
    sampler: PatchSampler
    loader: torch.utils.data.DataLoader
    provenance: dict  # what every saved model.json records of this run

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_DIR / STATE_FILE

    @property
    def max_steps(self) -> int:
        return int(self.cfg["train"]["max_steps"])

    @property
    def global_batch(self) -> int:
        return int(self.cfg["train"]["batch_size"])

    # --- state I/O ---------------------------------------------------------------------------------------

    def state_payload(self) -> dict:
        p, opt = self.progress, self.opt
        rng = gather_rng_states(self.dist_info)  # a collective under DDP
        return {
            "format": "dinomed-finetune-state/1", "step": p.step, "model": self.model.state_dict(),
            "optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(), "plateau": opt.plateau.state_dict(),
            "rng": rng, "best_dice": p.best_dice, "best_step": -1 if p.best_step is None else p.best_step,
            "config": json.dumps(self.cfg), "history": json.dumps(p.history),
            "train_cases": self.split.train_names, "val_cases": self.split.val_names,
        }

    def checkpoint(self, finished: bool = False) -> None:
        """``state.pt``, ``history.json`` and ``status.json`` (every rank takes part; rank 0 writes)."""
        payload = self.state_payload()  # a collective under DDP: every rank takes part
        if not self.dist_info.main:
            return
        p, state_dir = self.progress, self.out_dir / STATE_DIR
        save_checkpoint(self.state_path, payload)
        atomic_write_text(state_dir / "history.json", json.dumps(p.history, indent=1))
        atomic_write_text(state_dir / STATUS_FILE, json.dumps({
            "format": "dinomed-run-status/1", "kind": "finetune", "name": self.cfg["name"], "step": p.step,
            "total": self.max_steps, "finished": finished, "best_step": p.best_step,
            "best_dice": p.best_dice if math.isfinite(p.best_dice) else None,
            "config": str((state_dir / "config.yaml").resolve()),
            "data": str(Path(self.data_dir).resolve()), "command": self.command}, indent=1))

    # --- validation ----------------------------------------------------------------------------------------

    def validate_and_keep_best(self) -> None:
        """Rank 0 scores the held-out cases, steps the plateau schedule and saves a better model; all ranks wait."""
        from ..models import save_model_folder

        p = self.progress
        if self.dist_info.main:
            started = time.perf_counter()
            scores = validate(self.model, self.model_json, self.val_cases, self.split.spec.labels.entries,
                              self.cfg["train"]["amp"])
            record = {"phase": "val", "step": p.step, "epoch": self.sampler.epoch_of(p.step * self.global_batch),
                      **scores, "seconds": round(time.perf_counter() - started, 3)}
            p.history.append(record)
            self.events.metric(**record)
            score = scores["dice"] if math.isfinite(scores["dice"]) else -1.0
            if self.opt.plateau_owns_lr(p.step):
                self.opt.plateau.step(score)
            if score > p.best_dice or p.best_step is None:
                p.best_dice, p.best_step = score, p.step
                self.model_json["provenance"] = {**self.model_json["provenance"], **self.provenance,
                                                 "metrics": {"step": p.step, **scores}}
                save_model_folder(self.model, self.model_json, self.out_dir)
                self.events.artifact("model", str(self.out_dir), step=p.step, dice=scores["dice"])
        barrier(self.dist_info)

    # --- the steps -------------------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> torch.Tensor:
        """One optimiser step on this rank's share of a global batch; returns the (detached) loss."""
        opt, optim_cfg = self.opt, self.cfg["optim"]
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with autocast(self.device, opt.amp_dtype):
            logits = self.train_model(images)
        loss = opt.loss_fn(logits.float(), labels)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if optim_cfg["grad_clip"]:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(optim_cfg["grad_clip"]))
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        if not opt.plateau_owns_lr(self.progress.step):
            opt.scheduler.step()
        self.progress.step += 1
        return loss.detach()

    def agree_on_loss_and_time(self, loss: torch.Tensor, out_of_time: bool) -> tuple[float, bool]:
        """The loss averaged over the ranks, and whether any rank ran out of its time budget."""
        # (on this rank's device: nccl reduces GPU tensors only)
        flags = torch.tensor([float(loss), float(out_of_time)], dtype=torch.float64, device=self.device)
        if self.dist_info.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flags)
            flags[0] /= self.dist_info.world_size
        return float(flags[0]), bool(flags[1] > 0)

    def check_loss(self, loss: float) -> None:
        if not math.isfinite(loss):
            saved = (f"the last checkpoint, from before this step, is {self.state_path}; continue from it with "
                     "--resume and a lower optim.lr=…"
                     if self.state_path.is_file() else "no checkpoint had been saved yet, so the run folder is removed")
            check_finite_loss(loss, f"step {self.progress.step}", f"lower optim.lr or check the data ({saved})")

    def run_steps(self, stop: StopRequest) -> bool:
        """Train to ``max_steps``, the time budget, ``stop_after`` or a stop request; True if stopped early."""
        train_cfg, p, events, max_steps = self.cfg["train"], self.progress, self.events, self.max_steps
        val_every, log_every = int(train_cfg["val_every"]), int(train_cfg["log_every"])
        save_every = int(train_cfg["save_every"] or val_every)
        stop_after, max_seconds = train_cfg["stop_after"], train_cfg["max_seconds"]
        start_step = p.step
        clock = time.process_time if train_cfg["clock"] == "process" else time.perf_counter
        started = clock()
        self.train_model.train()
        for batch in _batches(self.loader, p.step, max_steps):
            loss = self.train_step(batch)
            out_of_time = max_seconds is not None and clock() - started >= float(max_seconds)
            loss_value, any_out_of_time = self.agree_on_loss_and_time(loss, out_of_time)
            last = p.step == max_steps or any_out_of_time  # the time budget ends the run like its last step
            self.check_loss(loss_value)
            if p.step % log_every == 0 or last:
                record = {"phase": "train", "step": p.step,
                          "epoch": self.sampler.epoch_of((p.step - 1) * self.global_batch),
                          "loss": loss_value, "lr": self.opt.optimizer.param_groups[-1]["lr"],
                          "elapsed": round(clock() - started, 3)}
                p.history.append(record)
                events.metric(**record)
            events.progress(p.step, max_steps, "steps")
            if p.step % val_every == 0 or last:
                self.validate_and_keep_best()
            # a stop asked for during this step (or its validation) ends the run here, on every rank
            stop_now = not last and (stop.agree(self.dist_info, self.device) or (
                stop_after is not None and start_step < int(stop_after) <= p.step))
            if p.step % save_every == 0 or last or stop_now:
                self.checkpoint(finished=last)
            if last and p.step < max_steps:
                events.log(f"time budget of {max_seconds} s reached at step {p.step}")
                return False
            if stop_now:
                events.log(f"stopped at step {p.step}; continue with --resume")
                return True
        return False

    def result(self, stopped: bool) -> FinetuneResult:
        p = self.progress
        return FinetuneResult(out_dir=self.out_dir, step=p.step, best_step=p.best_step, best_dice=p.best_dice,
                              stopped=stopped, history=p.history, train_cases=self.split.train_names,
                              val_cases=self.split.val_names, main_process=self.dist_info.main)


# ---------------------------------------------------------------------------------------------------------
# set-up and the whole run


def _set_up(cfg: dict, data_dir: str | Path, out_dir: Path, resume: bool, command: str | None, dist_info: DistInfo,
            device: torch.device, events: EventWriter) -> _Run:
    """Everything before the first step, in an order that keeps the seeded draws as they were: checks, data,
    model, optimisation, a fresh start or the resumed state, the resolved config, DDP, the patch loader."""
    train_cfg = cfg["train"]
    state_path = out_dir / STATE_DIR / STATE_FILE
    check_run_folder(state_path, resume, "training run", out_dir)
    global_batch = int(train_cfg["batch_size"])
    if global_batch % dist_info.world_size:
        raise DinomedError(
            f"config train.batch_size {global_batch} is not divisible by the {dist_info.world_size} processes"
        )
    split = _open_data(cfg, data_dir, events)
    model = _build_model(cfg, split.spec, resume, events)
    channel_specs, preprocessing = _input_preprocessing(cfg)
    model_json = _model_json(cfg, model, split.spec, preprocessing)
    model.to(device)
    load = _CaseCache(split.spec, channel_specs, preprocessing)
    val_cases = [load(n) for n in split.val_names] if dist_info.main else []
    opt = _make_optimisation(model, cfg, device)
    seed = int(train_cfg["seed"])
    progress = (_resume(state_path, cfg, split, model, opt, dist_info, events) if resume
                else _start_fresh(out_dir, seed, dist_info))
    if dist_info.main:
        atomic_write_text(out_dir / STATE_DIR / "config.yaml", dump_config(cfg))
    train_model = wrap_ddp(model, device, dist_info, find_unused_parameters=bool(train_cfg["find_unused_parameters"]))
    max_steps, data_cfg = int(train_cfg["max_steps"]), cfg["data"]
    sampler = PatchSampler(split.train_names, load, data_cfg["patch_size"], split.spec.labels.num_classes, data_cfg,
                           cfg["augment"], seed)
    loader = torch.utils.data.DataLoader(
        PatchDataset(sampler), batch_size=global_batch // dist_info.world_size,
        sampler=StepIndices(progress.step, max_steps, global_batch, dist_info.rank, dist_info.world_size),
        num_workers=int(train_cfg["num_workers"]), pin_memory=device.type == "cuda",
        persistent_workers=False)
    provenance = {
        "command": command or "dinomed.finetune.finetune(...)",
        "config": cfg,
        "data": str(Path(data_dir).resolve()),
        "train_cases": split.train_names,
        "val_cases": split.val_names,
        "world_size": dist_info.world_size,
    }
    events.log(f"finetuning {model.model_entry.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
               f"{len(split.train_names)} training / {len(split.val_names)} held-out case(s), "
               f"{dist_info.world_size} process(es), {device}, steps {progress.step}..{max_steps}")
    return _Run(cfg=cfg, data_dir=Path(data_dir), out_dir=out_dir, command=command, dist_info=dist_info, device=device,
                events=events, split=split, model=model, train_model=train_model, model_json=model_json,
                val_cases=val_cases, opt=opt, progress=progress, sampler=sampler, loader=loader,
                provenance=provenance)


def finetune(cfg: dict, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
             events: EventWriter | None = None, command: str | None = None) -> FinetuneResult:
    """Train ``cfg["model"]`` on the dataset in ``data_dir``; the best model folder goes to ``out_dir``."""
    dist_info, device = init_distributed(cfg["train"]["device"])
    events = events if (events is not None and dist_info.main) else EventWriter(enabled=False, quiet=not dist_info.main)
    stop = StopRequest()  # a stop asked for during the set-up takes effect after the first step
    out_existed = Path(out_dir).exists()
    try:
        stop.__enter__()
        run = _set_up(cfg, data_dir, Path(out_dir), resume, command, dist_info, device, events)
        return run.result(stopped=run.run_steps(stop))
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
