"""Partial FC: margin softmax over millions of identities, class centres sharded across ranks.

Rank r of W holds the centres of classes [start_r, end_r) (uneven shards when W does not divide
the classes: the first C % W ranks hold one more). Every step:

1. all ranks exchange batch sizes and a bad-label count in one small all-gather, so a label outside
   [0, num_classes) raises the same ValueError on every rank *before* any large collective (a rank
   that raised alone would leave the others blocked in the next collective);
2. embeddings and labels are all-gathered (variable batch sizes allowed); the gather's backward
   sums each rank's gradient for its rows, so each rank gets the gradient of the global loss;
3. each rank keeps every class of its shard that is a positive of the global batch and samples
   the rest up to ceil(sample_rate * shard) classes, reproducibly from (seed, rank, step);
4. cosine logits for the sampled centres only, margin on the target logits (float32);
5. softmax cross-entropy across shards with an all-reduced row max and sum of exponentials:
   no rank ever holds more than (global batch) x (its sampled classes) logits.

The loss returned is the mean over the global batch and is identical on every rank. With
sample_rate = 1 it equals the full (margin) softmax, gradients included.

The centre gradient is sparse (only sampled rows), and PartialFCSGD updates only those rows, so
a rank's optimizer state is a momentum buffer of its own shard: each rank saves its shard and
its momentum in its own checkpoint (`state_dict()` carries the shard range, checked on load).
A checkpoint of W ranks resumes on any W' ranks: each new rank cuts its class range out of the
saved shards that overlap it (`load_resharded`, `reshard_optimizer_state`; docs/ELASTIC.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ranray.config import MarginConfig, PartialFCConfig
from ranray.models.margin import CombinedMarginLoss

FLOAT32_BYTES = 4


# ---------------------------------------------------------------------------------------------
# Shards and sample counts (pure arithmetic, shared by the module and the memory estimate)
# ---------------------------------------------------------------------------------------------


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's classes; the first num_classes % world_size ranks hold one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sample_count(num_local: int, sample_rate: float) -> int:
    """Classes a rank samples per step: ceil(rate * shard), at least 1 (more if the batch has
    more positives in the shard: every positive is always kept)."""
    return min(num_local, max(1, math.ceil(sample_rate * num_local)))


def _step_seed(seed: int, rank: int, step: int) -> int:
    # Distinct, reproducible streams per (seed, rank, step); constants are the usual hash mixers.
    return (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % (2**63)


# ---------------------------------------------------------------------------------------------
# Collectives with autograd
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Comm:
    """The process group (or none), so the same code runs distributed and in one process."""

    group: Any
    rank: int
    world_size: int

    @classmethod
    def create(cls, group: Any = None) -> "_Comm":
        if not (dist.is_available() and dist.is_initialized()):
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def all_gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows (counts may differ: padded to the largest)."""
        if self.world_size == 1:
            return x
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def all_reduce(self, x: torch.Tensor, op: Any = None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=self.group)
        return x


class _GatherRows(torch.autograd.Function):
    """All-gather of embeddings whose backward hands each rank the summed gradient of its rows.

    Every rank backpropagates the same global loss through its own shard of logits, so the true
    gradient of a rank's embeddings is the sum over ranks. An all-reduce (not reduce-scatter) is
    used because gloo has no reduce-scatter; it moves world x more bytes, but only (N, E) floats.
    `grad_scale` lets a caller whose backbone is under DDP (which averages) undo that average.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: _Comm, sizes: list[int], grad_scale: float) -> torch.Tensor:
        ctx.comm, ctx.sizes, ctx.grad_scale = comm, sizes, grad_scale
        out = comm.all_gather_rows(x, sizes)
        return x.clone() if out is x else out  # a Function must not hand its input back as output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = ctx.comm.all_reduce(grad.contiguous().clone())
        start = sum(ctx.sizes[: ctx.comm.rank])
        mine = grad[start: start + ctx.sizes[ctx.comm.rank]]
        return (mine * ctx.grad_scale if ctx.grad_scale != 1.0 else mine), None, None, None


class _DistMarginCrossEntropy(torch.autograd.Function):
    """Mean softmax CE over logits split column-wise across ranks, target logits given apart.

    forward: logits = s * cos with the target positions (rows, cols) set to `target` (already
    margin-ed and scaled); row max all-reduced (MAX), exp-sums and target logits all-reduced (SUM);
    loss_i = log(sum_i) + max_i - target_i, exact even when the target probability underflows.
    backward: d loss / d logits = (softmax - onehot) / N, computed in place on the saved softmax,
    so a rank keeps one (N, S) float32 tensor for the backward pass.
    """

    @staticmethod
    def forward(ctx, cos, target, rows, cols, scale, num_rows, comm):
        logits = cos.float() * scale
        logits[rows, cols] = target.to(logits.dtype)
        row_max = logits.max(dim=1).values  # every rank holds >= 1 class (checked in PartialFC)
        comm.all_reduce(row_max, dist.ReduceOp.MAX)
        logits.sub_(row_max[:, None]).exp_()
        sums = torch.zeros((2, logits.shape[0]), dtype=logits.dtype, device=logits.device)
        sums[0] = logits.sum(dim=1)
        sums[1, rows] = target.detach().to(logits.dtype)
        comm.all_reduce(sums)  # one collective for both: exp-sum and the target logit of each row
        logits.div_(sums[0][:, None])  # now the softmax, kept for backward
        ctx.save_for_backward(logits, rows, cols)
        ctx.scale, ctx.num_rows, ctx.cos_dtype = scale, num_rows, cos.dtype
        return (sums[0].log() + row_max - sums[1]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad, rows, cols = ctx.saved_tensors
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / ctx.num_rows)
        grad_target = grad[rows, cols].clone()
        grad[rows, cols] = 0.0  # those positions came from `target`, not from s * cos
        return grad.mul_(ctx.scale).to(ctx.cos_dtype), grad_target, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class PartialFC(nn.Module):
    """Class-sharded margin softmax. `forward(embeddings, labels) -> mean loss of the global batch`.

    embeddings: (B_rank, E) of this rank (any float dtype; autocast is honoured for the matmul,
    the margin and the softmax run in float32); labels: (B_rank,) int64 global class ids.
    """

    def __init__(self, num_classes: int, embedding_size: int = 512, sample_rate: float = 1.0,
                 margin: MarginConfig | None = None, seed: int = 0, process_group: Any = None,
                 embedding_grad_scale: float = 1.0, init_std: float = 0.01) -> None:
        super().__init__()
        self.comm = _Comm.create(process_group)
        if num_classes < self.comm.world_size:
            raise ValueError(f"num_classes {num_classes} < world size {self.comm.world_size}: "
                             "every rank needs at least one class")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.sample_rate, self.seed, self.step = sample_rate, seed, 0
        self.embedding_grad_scale = embedding_grad_scale
        self.class_start, self.class_end = shard_range(num_classes, self.comm.world_size, self.comm.rank)
        self.num_local = self.class_end - self.class_start
        self.num_sample = sample_count(self.num_local, sample_rate)
        self.margin = CombinedMarginLoss.from_config(margin or MarginConfig())
        gen = torch.Generator().manual_seed(_step_seed(seed, self.comm.rank, -1))
        self.weight = nn.Parameter(torch.randn(self.num_local, embedding_size, generator=gen) * init_std)
        self.last_index: torch.Tensor | None = None  # the sampled local classes of the last step

    @classmethod
    def from_config(cls, num_classes: int, cfg: PartialFCConfig, margin: MarginConfig, seed: int = 0,
                    **kwargs: Any) -> "PartialFC":
        return cls(num_classes, cfg.embedding_size, cfg.sample_rate, margin, seed, **kwargs)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sizes = self._exchange_and_check(embeddings, labels)
        emb = _GatherRows.apply(embeddings, self.comm, sizes, self.embedding_grad_scale)
        all_labels = self.comm.all_gather_rows(labels.to(torch.int64), sizes)
        index, rows, cols = self._sample(all_labels)
        self.last_index = index
        self.step += int(self.training)
        # F.embedding with sparse=True gives a gradient on the sampled rows only.
        centres = F.normalize(F.embedding(index, self.weight, sparse=True))
        emb = F.normalize(emb)
        cos = F.linear(emb, centres)
        # The target cosines again, in float32 and apart from the (maybe bf16) matmul: the margin
        # needs them exact, and their gradient then bypasses the (N, S) logits.
        cos_target = (emb[rows].float() * centres[cols].float()).sum(dim=1)
        target = self.margin.target_logit(cos_target)
        return _DistMarginCrossEntropy.apply(cos, target, rows, cols, self.margin.scale, len(all_labels),
                                             self.comm)

    def _exchange_and_check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Batch sizes of all ranks; raises the same ValueError on every rank for bad input."""
        bad = (labels < 0) | (labels >= self.num_classes)
        example = labels[bad][0].item() if bool(bad.any()) else 0
        shape_ok = (embeddings.dim() == 2 and labels.dim() == 1 and embeddings.shape[0] == labels.shape[0]
                    and embeddings.shape[-1] == self.embedding_size)
        info = torch.tensor([[labels.shape[0], int(bad.sum()), example, int(not shape_ok)]],
                            dtype=torch.int64, device=embeddings.device)
        info = self.comm.all_gather_rows(info, [1] * self.world_size).cpu()
        if int(info[:, 3].sum()):
            ranks = info[:, 3].nonzero().flatten().tolist()
            raise ValueError(f"PartialFC: embeddings must be (B, {self.embedding_size}) with one label each; "
                             f"rank(s) {ranks} passed other shapes (this rank: {tuple(embeddings.shape)}, "
                             f"{tuple(labels.shape)})")
        if int(info[:, 1].sum()):
            r = int(info[:, 1].nonzero()[0])
            raise ValueError(f"PartialFC: {int(info[:, 1].sum())} label(s) outside [0, {self.num_classes}) "
                             f"in the global batch, e.g. {int(info[r, 2])} on rank {r}; does num_classes "
                             "match the dataset?")
        return info[:, 0].tolist()

    def _sample(self, all_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled local class indices (sorted) and the (row, column) of each local target."""
        local = all_labels - self.class_start
        rows = torch.nonzero((local >= 0) & (local < self.num_local), as_tuple=True)[0]
        device = self.weight.device
        if not self.training or self.num_sample >= self.num_local:
            return torch.arange(self.num_local, device=device), rows, local[rows]
        positive = torch.unique(local[rows])
        gen = torch.Generator(device=device).manual_seed(_step_seed(self.seed, self.rank, self.step))
        score = torch.rand(self.num_local, generator=gen, device=device)
        score[positive] = 2.0  # positives rank above every random score, so topk keeps them all
        count = max(self.num_sample, positive.numel())
        index = torch.topk(score, count, sorted=False).indices.sort().values
        return index, rows, torch.searchsorted(index, local[rows])

    # -- checkpoint: the shard range travels with the weights and is checked on load ----------

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_start": self.class_start, "class_end": self.class_end,
                "rank": self.rank, "world_size": self.world_size, "sample_rate": self.sample_rate,
                "seed": self.seed, "step": self.step, "embedding_size": self.embedding_size}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = (state["num_classes"], state["class_start"], state["class_end"])
        mine = (self.num_classes, self.class_start, self.class_end)
        if saved != mine:
            raise ValueError(
                f"PartialFC checkpoint holds classes [{saved[1]}, {saved[2]}) of {saved[0]} (rank "
                f"{state['rank']} of {state['world_size']}); this rank holds [{mine[1]}, {mine[2]}) of "
                f"{mine[0]}: resume with the same num_classes and world size")
        self.step = int(state["step"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Take this rank's classes from the module state_dicts of another group's ranks (those
        holding some of them, any order): centres bit for bit, and the sampling step count."""
        extras = [st["_extra_state"] for st in states]
        for key in ("num_classes", "embedding_size"):
            saved = {x[key] for x in extras}
            if saved != {getattr(self, key)}:
                raise ValueError(f"PartialFC checkpoint has {key}={sorted(saved)}, this run {getattr(self, key)}: "
                                 f"a checkpoint resumes only with the same {key}")
        parts = [(x["class_start"], x["class_end"], st["weight"]) for x, st in zip(extras, states)]
        with torch.no_grad():
            self.weight.copy_(reshard_rows(parts, self.class_start, self.class_end))
        self.step = int(extras[0]["step"])  # every rank counts the same steps

    def extra_repr(self) -> str:
        return (f"classes [{self.class_start}, {self.class_end}) of {self.num_classes}, "
                f"embedding {self.embedding_size}, sample_rate {self.sample_rate} ({self.num_sample}/step)")


# ---------------------------------------------------------------------------------------------
# Optimizer: momentum per shard, updated only where the sparse gradient has rows
# ---------------------------------------------------------------------------------------------


class PartialFCSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay that updates only the rows present in a sparse gradient.

    Unsampled centres keep both their weight and momentum this step (what Partial FC's authors
    do); a dense gradient updates every row, exactly as torch.optim.SGD (dampening 0, no
    Nesterov): v = mu * v + g + wd * w; w -= lr * v. The state is one momentum buffer per
    parameter, i.e. per rank's shard, and saves with `state_dict()` like any optimizer.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            grad = grad.coalesce()
            if grad._nnz() < p.shape[0]:
                self._update_rows(p, grad.indices()[0], grad.values(), group)
                return
            grad = grad.values()  # every row, in order (coalesced indices are sorted and unique)
        buf = self._momentum(p)
        buf.mul_(group["momentum"]).add_(grad)
        if group["weight_decay"]:
            buf.add_(p, alpha=group["weight_decay"])
        p.add_(buf, alpha=-group["lr"])

    def _update_rows(self, p: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        buf = self._momentum(p)
        step = buf[rows].mul_(group["momentum"]).add_(grad)
        if group["weight_decay"]:
            step.add_(p[rows], alpha=group["weight_decay"])
        buf.index_copy_(0, rows, step)
        p.index_add_(0, rows, step, alpha=-group["lr"])

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return buf


class PartialFCAdamW(torch.optim.AdamW):
    """torch.optim.AdamW on a rank's shard: the sparse centre gradient is made dense first.

    This is what insightface does (arcface_torch: AdamW over backbone and Partial FC, whose
    centres get a dense gradient with zero rows for the classes not sampled): every row's moments
    decay and every row is decayed each step, sampled or not. Its state (exp_avg, exp_avg_sq: one
    row per class; step: one count) saves with `state_dict()` like PartialFCSGD's momentum.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        return super().step(closure)


# optim.name -> the head's optimizer, from (module, lr, momentum, weight_decay)
HEAD_OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda module, lr, momentum, weight_decay: PartialFCSGD(
        module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay),
    "adamw": lambda module, lr, momentum, weight_decay: PartialFCAdamW(
        module.parameters(), lr=lr, weight_decay=weight_decay),
}


def make_optimizer(module: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   name: str = "sgd") -> torch.optim.Optimizer:
    """The optimizer for a rank's shard (keep it apart from the backbone's: its state is per rank);
    `name` is optim.name, so the head gets the backbone's kind of optimizer."""
    if name not in HEAD_OPTIMIZERS:
        raise ValueError(f"no Partial FC optimizer {name!r}; known: {sorted(HEAD_OPTIMIZERS)}")
    return HEAD_OPTIMIZERS[name](module, lr, momentum, weight_decay)


# ---------------------------------------------------------------------------------------------
# Resharding: a checkpoint of W ranks onto W' ranks (any W, W'; uneven shards included)
# ---------------------------------------------------------------------------------------------


def overlapping_ranks(num_classes: int, world_size: int, start: int, end: int) -> list[int]:
    """The ranks of a `world_size` group whose shards hold some of the classes [start, end)."""
    ranks = []
    for rank in range(world_size):
        lo, hi = shard_range(num_classes, world_size, rank)
        if lo < end and hi > start:
            ranks.append(rank)
    return ranks


def reshard_rows(parts: list[tuple[int, int, torch.Tensor]], start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a class-indexed tensor saved as pieces (first class, end class, rows)."""
    pieces = [rows[max(start, lo) - lo: min(end, hi) - lo] for lo, hi, rows in sorted(parts, key=lambda p: p[0])
              if lo < end and hi > start]
    out = torch.cat(pieces) if pieces else torch.empty(0)
    if out.shape[0] != end - start:
        covered = [(lo, hi) for lo, hi, _ in parts]
        raise ValueError(f"the saved shards {covered} do not cover classes [{start}, {end})")
    return out


def reshard_optimizer_state(states: list[dict[str, Any]], ranges: list[tuple[int, int]], start: int,
                            end: int) -> dict[str, Any]:
    """An optimizer state_dict for classes [start, end) from those of the ranks holding `ranges`.

    Per-class tensors (first dimension = the shard's rows: momentum, exp_avg, exp_avg_sq) are cut
    to the new range; everything else (AdamW's step count, the param groups) is the same on every
    rank, since the ranks step together, and is taken from the first.
    """
    first = states[0]
    new_state: dict[Any, dict[str, Any]] = {}
    for pid, buffers in first["state"].items():
        new_state[pid] = {}
        for name, value in buffers.items():
            per_class = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == ranges[0][1] - ranges[0][0]
            new_state[pid][name] = (reshard_rows([(lo, hi, st["state"][pid][name]) for (lo, hi), st in zip(ranges, states)],
                                                 start, end) if per_class else value)
    return {"state": new_state, "param_groups": first["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Memory: what one rank holds at its peak (the backward of the head), from the tensors above
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank for the classification head (the backbone is not included)."""

    classes_per_rank: int
    sampled_per_rank: int
    global_batch: int
    weights: int  # the shard of centres, fp32
    momentum: int  # PartialFCSGD's buffer, same shape
    sampled_centres: int  # gathered rows, normalised rows, their gradients, the sparse grad values
    embeddings: int  # gathered, normalised, their gradients
    logits: int  # cosines + the softmax kept for backward (float32)
    dense_grad: int = 0  # only without Partial FC: a full (C, E) weight gradient to all-reduce

    @property
    def total(self) -> int:
        return (self.weights + self.momentum + self.sampled_centres + self.embeddings + self.logits
                + self.dense_grad)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


# Counts of (rows x E) or (N x S) float32 tensors alive at the peak, read off PartialFC.forward /
# _DistMarginCrossEntropy: see docs/SCALING.md for the walk-through.
SAMPLED_COPIES = 4
EMBEDDING_COPIES = 4
LOGIT_COPIES = 2


def memory_estimate(num_classes: int, embedding_size: int, world_size: int, batch_per_rank: int,
                    sample_rate: float = 1.0, partial_fc: bool = True) -> MemoryEstimate:
    """Peak head memory per rank, each group of tensors at its own peak (docs/SCALING.md).

    partial_fc=False is plain data parallelism: every rank holds all centres, their momentum, a
    normalised copy and its gradient, and a dense (C, E) gradient to all-reduce, and computes
    logits for its own batch only.
    """
    row = embedding_size * FLOAT32_BYTES
    if not partial_fc:
        full = num_classes * row
        return MemoryEstimate(num_classes, num_classes, batch_per_rank, full, full, 2 * full,
                              EMBEDDING_COPIES * batch_per_rank * row,
                              LOGIT_COPIES * batch_per_rank * num_classes * FLOAT32_BYTES, full)
    start, end = shard_range(num_classes, world_size, 0)  # rank 0 holds the largest shard
    local, n = end - start, batch_per_rank * world_size
    sampled = sample_count(local, sample_rate)
    return MemoryEstimate(local, sampled, n, local * row, local * row, SAMPLED_COPIES * sampled * row,
                          EMBEDDING_COPIES * n * row, LOGIT_COPIES * n * sampled * FLOAT32_BYTES)


def max_sample_rate(budget_bytes: int, num_classes: int, embedding_size: int, world_size: int,
                    batch_per_rank: int) -> float:
    """The largest sample rate (in steps of 0.01) whose head fits in budget_bytes; 0 if none."""
    for pct in range(100, 0, -1):
        est = memory_estimate(num_classes, embedding_size, world_size, batch_per_rank, pct / 100)
        if est.total <= budget_bytes:
            return pct / 100
    return 0.0


# docs/SCALING.md's table is this function's output (a test keeps them equal).
