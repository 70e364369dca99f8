"""The three classifiers of the benchmark on frozen features (section 3.1): k-NN, a linear probe, and ABMIL.

Each returns probabilities ``(N, K)`` for the outputs of a :class:`~dinomed.classify.labels.LabelTable` (the
binary labels of a multi-label task, or the classes of a multi-class one).

- **Linear probe** (the paper's primary protocol): one linear layer on the frozen (slice-mean-pooled) features,
  binary cross-entropy, learning rate 0.005, batch size 1024, 50 epochs. The paper does not name the optimiser;
  ours is Adam (plain SGD at 0.005 barely moves in the 50 steps a small dataset gives). A multi-class column is
  trained with the cross-entropy over its classes, the multi-class form of the same loss. ``standardize``
  (our option, off by default) z-scores the features with the training part's statistics first.
- **k-NN**: "for each category, k-NN predicts presence or absence from feature similarity". The paper gives no
  k or weighting; ours is the k-NN evaluation of DINO/DINOv3 (Caron et al. 2021, following Wu et al. 2018):
  cosine similarity of L2-normalised features, the k = 20 nearest training cases, votes weighted by
  ``exp(similarity / 0.07)``; a label's probability is the weighted share of positive neighbours.
- **ABMIL** (attention-based deep multiple-instance learning, Ilse et al. 2018; the paper's equations 1-2): a
  bag of instance features (here the slices of a volume, or the patches of a slide) goes through a learnable
  linear projection ``h_k = W x_k``, gated attention ``a_k = softmax_k(w^T (tanh(V h_k) ⊙ σ(U h_k)))`` (the
  paper's equation 2 names the sigmoid σ: the gated variant), ``z = Σ a_k h_k``, and a linear head; bag-level
  (binary) cross-entropy; only projection, attention and head are trained. ``attention="plain"`` is Ilse et
  al.'s ungated form ``w^T tanh(V h_k)``. Optimiser, learning rate, epochs and sizes are not given by the paper;
  ours follow CLAM (Lu et al. 2021), the ABMIL implementation the pathology benchmarks use: Adam, learning rate
  2e-4, weight decay 1e-5, one bag per step, projection 128 and attention 128 wide, 20 epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import DinomedError


# ---------------------------------------------------------------------------------------------------- k-NN
def knn_probabilities(train_x: np.ndarray, train_t: np.ndarray, query_x: np.ndarray, k: int = 20,
                      temperature: float = 0.07, standardize: bool = False) -> np.ndarray:
    """Weighted k-NN votes (see the module docstring). ``train_t`` ``(N, K)`` 0/1 targets (one-hot for classes);
    returns ``(M, K)``: per output the weighted share of neighbours that have it.

    ``standardize`` (our option) z-scores the features with the training cases' statistics before the cosine
    similarity, which removes the component every case shares (the centring of SimpleShot, Wang et al. 2019);
    without it, features dominated by a common direction have cosine similarities all near 1.
    """
    if standardize:
        mean, std = train_x.mean(axis=0, keepdims=True), train_x.std(axis=0, keepdims=True) + 1e-6
        train_x, query_x = (train_x - mean) / std, (query_x - mean) / std
    if k < 1:
        raise DinomedError(f"--k must be at least 1, got {k}")
    if temperature <= 0:
        raise DinomedError(f"--temperature must be positive, got {temperature}")
    a = train_x / np.clip(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12, None)
    b = query_x / np.clip(np.linalg.norm(query_x, axis=1, keepdims=True), 1e-12, None)
    sim = b.astype(np.float64) @ a.astype(np.float64).T                       # (M, N)
    k = min(k, a.shape[0])
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]                     # (M, k), unordered
    s = np.take_along_axis(sim, nearest, axis=1)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)             # stable; ratios unchanged
    votes = np.einsum("mk,mkc->mc", w, train_t[nearest].astype(np.float64))
    return (votes / w.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- linear probe
@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def linear_probe(train_x: np.ndarray, train_t: np.ndarray, query_xs: Sequence[np.ndarray], task: str = "multilabel",
                 lr: float = 0.005, batch_size: int = 1024, epochs: int = 50, weight_decay: float = 0.0,
                 standardize: bool = False, seed: int = 0, device: str | None = "cpu",
                 on_epoch: Callable[[int, float], None] | None = None) -> tuple[list[np.ndarray], TrainLog]:
    """Train one linear layer (see the module docstring) and return the probabilities of each array of
    ``query_xs`` and the training log."""
    import torch
    from torch import nn

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise DinomedError(f"expected epochs ≥ 1, batch size ≥ 1 and a positive learning rate, got {epochs}, {batch_size}, {lr}")
    from ..runtime import resolve_device  # (torch is imported lazily here)

    dev = resolve_device(device)
    mean = train_x.mean(axis=0, keepdims=True) if standardize else 0.0
    std = train_x.std(axis=0, keepdims=True) + 1e-6 if standardize else 1.0
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    x = torch.from_numpy(((train_x - mean) / std).astype(np.float32)).to(dev)
    t = torch.from_numpy(train_t.astype(np.float32)).to(dev)
    head = nn.Linear(x.shape[1], t.shape[1]).to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()
    log = TrainLog()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(dev)
        total = 0.0
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            logits = head(x[idx])
            target = t[idx].argmax(dim=1) if task == "multiclass" else t[idx]
            loss = loss_fn(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        log.losses.append(total / x.shape[0])
        if on_epoch is not None:
            on_epoch(epoch + 1, log.losses[-1])
    outputs = []
    with torch.no_grad():
        for q in query_xs:
            if len(q) == 0:
                outputs.append(np.zeros((0, t.shape[1]), np.float32))
                continue
            logits = head(torch.from_numpy(((q - mean) / std).astype(np.float32)).to(dev))
            p = logits.softmax(dim=1) if task == "multiclass" else logits.sigmoid()
            outputs.append(p.cpu().numpy())
    return outputs, log


# ---------------------------------------------------------------------------------------------- ABMIL
def build_abmil(in_dim: int, n_outputs: int, proj_dim: int = 128, attn_dim: int = 128, attention: str = "gated"):
    """The ABMIL module (see the module docstring): bag ``(n, in_dim)`` -> logits ``(n_outputs,)`` and the
    attention weights ``(n,)``."""
    import torch
    from torch import nn

    if attention not in ("gated", "plain"):
        raise DinomedError(f"unknown attention {attention!r}; expected gated or plain")

    class ABMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Linear(in_dim, proj_dim)              # equation 1: h_k = W x_k
            self.attention_v = nn.Linear(proj_dim, attn_dim)           # V
            self.attention_u = nn.Linear(proj_dim, attn_dim) if attention == "gated" else None  # U (gate)
            self.attention_w = nn.Linear(attn_dim, 1)                  # w
            self.head = nn.Linear(proj_dim, n_outputs)

        def forward(self, bag):
            h = self.projection(bag)
            a = torch.tanh(self.attention_v(h))
            if self.attention_u is not None:
                a = a * torch.sigmoid(self.attention_u(h))
            weights = torch.softmax(self.attention_w(a).squeeze(-1), dim=0)   # equation 2
            z = (weights.unsqueeze(-1) * h).sum(dim=0)
            return self.head(z), weights

    return ABMIL()


def abmil(train_bags: Sequence[np.ndarray], train_t: np.ndarray, query_bags: Sequence[Sequence[np.ndarray]],
          task: str = "multilabel", attention: str = "gated", proj_dim: int = 128, attn_dim: int = 128,
          lr: float = 2e-4, weight_decay: float = 1e-5, epochs: int = 20, seed: int = 0, device: str | None = "cpu",
          on_epoch: Callable[[int, float], None] | None = None) -> tuple[list[np.ndarray], TrainLog, object]:
    """Train ABMIL on bags (one bag per step, shuffled each epoch) and return the probabilities of each list
    of ``query_bags``, the training log and the trained module."""
    import torch
    from torch import nn

    if epochs < 1 or lr <= 0:
        raise DinomedError(f"expected epochs ≥ 1 and a positive learning rate, got {epochs}, {lr}")
    from ..runtime import resolve_device  # (torch is imported lazily here)

    dev = resolve_device(device)
    torch.manual_seed(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    model = build_abmil(train_bags[0].shape[1], train_t.shape[1], proj_dim, attn_dim, attention).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()
    bags = [torch.from_numpy(b.astype(np.float32)).to(dev) for b in train_bags]
    targets = torch.from_numpy(train_t.astype(np.float32)).to(dev)
    log = TrainLog()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for i in torch.randperm(len(bags), generator=gen).tolist():
            logits, _ = model(bags[i])
            if task == "multiclass":
                loss = loss_fn(logits.unsqueeze(0), targets[i].argmax().unsqueeze(0))
            else:
                loss = loss_fn(logits, targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        log.losses.append(total / len(bags))
        if on_epoch is not None:
            on_epoch(epoch + 1, log.losses[-1])
    model.eval()
    outputs = []
    with torch.no_grad():
        for group in query_bags:
            probs = []
            for b in group:
                logits, _ = model(torch.from_numpy(b.astype(np.float32)).to(dev))
                probs.append((logits.softmax(dim=0) if task == "multiclass" else logits.sigmoid()).cpu().numpy())
            outputs.append(np.stack(probs) if probs else np.zeros((0, train_t.shape[1]), np.float32))
    return outputs, log, model
