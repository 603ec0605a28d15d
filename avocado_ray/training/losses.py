"""Distillation losses over a teacher's top-k logprobs (the alignment of a teacher's tokens: alignment.py).

Losses
------
A loss maps the student's logits at N answer positions ([N, V]), or the few values of them it reads
(`StudentView`: the log-sum-exp, the logits of the candidates and of the label, the tail's log-sum-exp), and the
`Targets` of those positions to one loss per position ([N]); `LOSSES` names them and `register` adds more.
`mix` weights them, falls back to the supervised loss where a position has no teacher distribution, and returns
sums and token counts, which is what a data-parallel trainer all-reduces (sum of losses / number of tokens over
all ranks).

- `supervised`: cross-entropy on the answer's next token (any teacher, any tokenizer; the baseline).
- `forward_kl`: KL(p || q), p the teacher, q the student: mode covering.
- `reverse_kl`: KL(q || p): mode seeking.
- `jsd`: generalised Jensen-Shannon, beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q and
  beta in (0, 1) the teacher's weight in the mixture, as in GKD (Agarwal et al., 2024) and TRL. beta = 0.5 is
  the symmetric JSD; JSD / beta tends to forward KL as beta -> 0, JSD / (1 - beta) to reverse KL as beta -> 1.

Tail bucket. A teacher serves only its top k logprobs per position. The rest of its mass, 1 - sum(exp(top k)),
is kept as one more bucket (clamped to at least `TAIL_EPS`, as served logprobs in float16 can sum past 1), and
the student is reduced to the same K + 1 buckets: its probabilities of the K candidate ids and, as its tail, the
mass of every other id, a log-sum-exp over the complement (exact and differentiable even when the tail is tiny).
The divergence compares these two K + 1 bucket distributions; candidate ids of a row must be distinct.

Bounded memory. `chunked_mix` is `mix` of the logits hidden @ W^T at the answer positions, computed
`LossOptions.chunk_tokens` positions at a time: a chunk's logits ([chunk, V], cast to float32 there) exist only
while that chunk's loss and its gradients (to the hidden states and to W) are taken, and the gradients are kept
for the backward pass (as Liger Kernel's fused linear cross-entropy does), so peak memory is one chunk's logits
and their gradient whatever the number of positions. Within a chunk a divergence gathers the K candidates' logits
and one log-sum-exp over the rest for the tail. `CausalLMLoss` runs a Hugging Face causal LM's decoder and this
loss in one forward, so that the full logits are never built and DeepSpeed ZeRO-3 gathers W for that forward.

Temperature T. The tail's own distribution is unknown on the teacher's side, so softmax(logits / T) has no
exact counterpart there. Both bucket distributions are therefore tempered the same way, b^(1/T) renormalised
over the K + 1 buckets (DistillKit's convention for a top-k teacher, applied to the student as well). Among the
K candidates this is exactly softmax(logits / T) for the student; only the tail is tempered as one token. As
both sides undergo the same map, a student equal to the teacher has zero loss at every T. Divergences are
multiplied by T^2 so that gradient scales stay comparable across temperatures (Hinton et al., 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from avocado_ray.config.training import LOSS_NAMES, LossSetting

TAIL_EPS = 1e-6
IGNORE_INDEX = -100  # a label the supervised loss ignores


@dataclass(frozen=True)
class Targets:
    """What the student is compared with at N answer positions (rows align with the logits' rows)."""

    labels: torch.Tensor  # [N] int64: the next token in student ids; -100 is ignored by the supervised loss
    topk_ids: torch.Tensor  # [N, K] int64: teacher candidates in student ids, distinct per row, -1 pads
    topk_logprobs: torch.Tensor  # [N, K] float: the teacher's logprobs of those candidates (at temperature 1)
    distill: torch.Tensor  # [N] bool: the row has a teacher distribution; elsewhere `mix` uses the supervised loss

    def __getitem__(self, rows: slice) -> Targets:
        return Targets(self.labels[rows], self.topk_ids[rows], self.topk_logprobs[rows], self.distill[rows])


@dataclass(frozen=True)
class LossOptions:
    """Settings of the losses: the chunk size, and the temperature and JSD beta a loss takes when its
    `LossSetting` in the config (trainer.losses) does not set its own (`loss_setting`)."""

    temperature: float = 1.0
    jsd_beta: float = 0.5
    chunk_tokens: int = 1024  # positions whose logits `chunked_mix` holds at once

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be > 0, got {self.chunk_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(f"jsd_beta must lie in (0, 1), got {self.jsd_beta}")


class StudentView(NamedTuple):
    """All that the losses read of the student's logits at N positions: their log-sum-exp, the logits of the
    K candidate ids and of the label, and the log-sum-exp over the ids that are not candidates (the tail)."""

    norm: torch.Tensor  # [N]
    candidates: torch.Tensor  # [N, K]
    label: torch.Tensor  # [N]
    tail: torch.Tensor  # [N]

    @classmethod
    def of(cls, logits: torch.Tensor, targets: Targets) -> StudentView:
        valid = (targets.topk_ids >= 0) & torch.isfinite(targets.topk_logprobs)
        return cls(*_Reduce.apply(logits.float(), targets.topk_ids.clamp(min=0), valid, targets.labels.clamp(min=0)))


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last dimension of a 2-D tensor, computed in place in `x` (which it overwrites)."""
    top = x.amax(-1, keepdim=True)
    top = top.masked_fill(top == -math.inf, 0.0)  # a row of -inf only: its sum is 0, its log-sum-exp -inf
    return x.sub_(top).exp_().sum(-1).log_() + top[:, 0]


class _Reduce(torch.autograd.Function):
    """`StudentView` of float32 logits [N, V] with one [N, V] buffer beside them, forward and backward.

    Backward: outside the candidates, d norm + d tail = exp(z - tail) (g_norm exp(tail - norm) + g_tail), which
    stays finite as tail <= norm and exact when the tail's mass is tiny; at a candidate only norm's share,
    exp(z - norm) g_norm; then the gathered logits' gradients scatter back.
    """

    @staticmethod
    def forward(ctx, logits, ids, valid, labels):
        ctx.set_materialize_grads(False)  # an output that no loss reads passes no gradient
        # amax, not scatter: a pad clamped to id 0 must not unmark a real candidate 0 of the same row
        in_topk = torch.zeros_like(logits, dtype=torch.uint8).scatter_reduce_(1, ids, valid.to(torch.uint8), "amax")
        in_topk = in_topk.view(torch.bool)
        buffer = logits.clone()
        norm = _logsumexp_(buffer)
        tail = _logsumexp_(buffer.copy_(logits).masked_fill_(in_topk, -math.inf))
        ctx.save_for_backward(logits, ids, valid, labels, in_topk, norm, tail)
        return norm, logits.gather(1, ids), logits.gather(1, labels[:, None])[:, 0], tail

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_norm, grad_candidates, grad_label, grad_tail):
        logits, ids, valid, labels, in_topk, norm, tail = ctx.saved_tensors
        if grad_norm is None and grad_tail is None:
            grad = torch.zeros_like(logits)
        else:
            grad_norm = torch.zeros_like(norm) if grad_norm is None else grad_norm
            outside = grad_norm * (tail - norm).exp() + (0.0 if grad_tail is None else grad_tail)
            grad = (logits - tail[:, None]).exp_().mul_(outside[:, None]).masked_fill_(in_topk, 0.0)
            at_candidates = (logits.gather(1, ids) - norm[:, None]).exp() * grad_norm[:, None] * valid
            grad.scatter_add_(1, ids, at_candidates)
        if grad_candidates is not None:
            grad.scatter_add_(1, ids, grad_candidates)
        if grad_label is not None:
            grad.scatter_add_(1, labels[:, None], grad_label[:, None])
        return grad, None, None, None


Student = torch.Tensor | StudentView  # logits [N, V], or what the losses read of them
LossFn = Callable[[Student, Targets, LossOptions], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Add a per-position loss to `LOSSES` under `name`, so that configs can weight it (the name is declared in
    config/training.py, LOSS_NAMES, so that a config is checked without importing torch)."""
    if name not in LOSS_NAMES:
        raise ValueError(f"loss {name!r} is not declared in avocado_ray.config (LOSS_NAMES {LOSS_NAMES})")

    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return add


def loss_setting(setting: float | LossSetting, options: LossOptions) -> tuple[float, LossOptions]:
    """(weight, options) of one loss: a bare number is a weight with `options` as they are; a config's
    `LossSetting` (config/training.py, LOSS_PARAMS) brings its own temperature and (jsd) beta."""
    if not isinstance(setting, LossSetting):
        return float(setting), options
    own = {"temperature": getattr(setting, "temperature", None), "jsd_beta": getattr(setting, "beta", None)}
    return setting.weight, replace(options, **{key: value for key, value in own.items() if value is not None})


def _view(student: Student, targets: Targets) -> StudentView:
    return student if isinstance(student, StudentView) else StudentView.of(student, targets)


@register("supervised")
def supervised(student: Student, targets: Targets, options: LossOptions) -> torch.Tensor:
    """Cross-entropy on the label at temperature 1 (labels of -100 give 0)."""
    view = _view(student, targets)
    return torch.where(targets.labels != IGNORE_INDEX, view.norm - view.label, 0.0)


def _buckets(student: Student, targets: Targets, temperature: float):
    """Student and teacher log-probs over the K candidates + tail, tempered; pads hold 0 and are False in `valid`."""
    view = _view(student, targets)
    valid = (targets.topk_ids >= 0) & torch.isfinite(targets.topk_logprobs)
    logq = torch.cat([view.candidates, view.tail[:, None]], dim=-1) - view.norm[:, None]
    student = torch.cat([logq[:, :-1].masked_fill(~valid, -math.inf), logq[:, -1:]], dim=-1)
    teacher = targets.topk_logprobs.float().masked_fill(~valid, -math.inf)
    teacher_tail = torch.log((1 - teacher.exp().sum(-1, keepdim=True)).clamp(min=TAIL_EPS))
    teacher = torch.cat([teacher, teacher_tail], dim=-1)
    valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1)
    # renormalising also absorbs the tail clamp; pads become 0 so that no -inf reaches later arithmetic
    student = torch.log_softmax(student / temperature, dim=-1).masked_fill(~valid, 0.0)
    teacher = torch.log_softmax(teacher / temperature, dim=-1).masked_fill(~valid, 0.0)
    return student, teacher, valid


def _kl(log_a: torch.Tensor, log_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row over the valid buckets."""
    return (log_a.exp() * (log_a - log_b)).masked_fill(~valid, 0.0).sum(-1)


@register("forward_kl")
def forward_kl(student: Student, targets: Targets, options: LossOptions) -> torch.Tensor:
    """KL(teacher || student) over the K + 1 buckets, times T^2."""
    student, teacher, valid = _buckets(student, targets, options.temperature)
    return options.temperature**2 * _kl(teacher, student, valid)


@register("reverse_kl")
def reverse_kl(student: Student, targets: Targets, options: LossOptions) -> torch.Tensor:
    """KL(student || teacher) over the K + 1 buckets, times T^2."""
    student, teacher, valid = _buckets(student, targets, options.temperature)
    return options.temperature**2 * _kl(student, teacher, valid)


@register("jsd")
def jsd(student: Student, targets: Targets, options: LossOptions) -> torch.Tensor:
    """Generalised JSD with the teacher's weight `jsd_beta` in the mixture, over the K + 1 buckets, times T^2."""
    student, teacher, valid = _buckets(student, targets, options.temperature)
    beta = options.jsd_beta
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1 - beta))
    divergence = beta * _kl(teacher, mixture, valid) + (1 - beta) * _kl(student, mixture, valid)
    return options.temperature**2 * divergence


class MixedLoss(NamedTuple):
    """The weighted loss of a batch as sums and counts, ready for an all-reduce over ranks."""

    total: torch.Tensor  # scalar, differentiable: sum over the masked positions of the weighted loss
    tokens: torch.Tensor  # scalar: masked positions (divide the all-reduced total by the all-reduced tokens)
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (detached sum, count) where the term applies


def mix(
    logits: torch.Tensor,
    targets: Targets,
    mask: torch.Tensor,
    weights: dict[str, float | LossSetting],
    options: LossOptions,
) -> MixedLoss:
    """Sum over `mask` of sum_name weight * loss, a divergence replaced by the supervised loss where not `distill`.

    Each term is also reported alone over the positions it covers (divergences: masked and `distill`), so a
    weight of 0 logs a term without training on it.
    """
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown or not weights:
        raise ValueError(f"loss weights must name some of {sorted(LOSSES)}, got {sorted(weights)}")
    student = StudentView.of(logits, targets)  # the vocabulary is read once, for every term
    fallback = supervised(student, targets, options)
    total = torch.zeros_like(fallback)
    terms = {}
    for name, setting in weights.items():
        weight, own = loss_setting(setting, options)
        if name == "supervised":
            loss, covered, applied = fallback, mask, fallback
        else:
            loss, covered = LOSSES[name](student, targets, own), mask & targets.distill
            applied = torch.where(targets.distill, loss, fallback)
        total = total + weight * applied
        terms[name] = (torch.where(covered, loss, 0.0).sum().detach(), covered.sum())
    return MixedLoss(torch.where(mask, total, 0.0).sum(), mask.sum(), terms)


def _chunk_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    loss_of: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk: int,
    need: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum over chunks of rows of loss_of(hidden[rows] @ weight^T in float32, rows), and where `need` says so its
    gradients to hidden and weight (the latter summed in float32 in place), taken chunk by chunk so that one
    chunk's logits and their gradient exist at a time."""
    grad_hidden = torch.zeros_like(hidden) if need[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(len(hidden), 1), chunk):  # one chunk at least, so that an empty batch has its terms
        total += _chunk_loss(hidden, weight, loss_of, slice(start, start + chunk), grad_hidden, grad_weight)
    return total, grad_hidden, grad_weight


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    loss_of: Callable[[torch.Tensor, slice], torch.Tensor],
    rows: slice,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> torch.Tensor:
    """One chunk of `_chunk_losses`; its logits, their gradient and its graph go when this returns."""
    need = grad_hidden is not None or grad_weight is not None
    with torch.no_grad():
        logits = F.linear(hidden[rows], weight).float().requires_grad_(need)
    with torch.set_grad_enabled(need):
        loss = loss_of(logits, rows)
    if need:
        (grad,) = torch.autograd.grad(loss, logits)
        if grad_hidden is not None:
            grad_hidden[rows] = grad.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, hidden[rows].float())
    return loss.detach()


class _ChunkedLoss(torch.autograd.Function):
    """`_chunk_losses` as an autograd function: gradients are taken in the forward pass and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, loss_of, chunk):
        need = ctx.needs_input_grad[:2]
        total, ctx.grad_hidden, ctx.grad_weight = _chunk_losses(hidden, weight, loss_of, chunk, need)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in (ctx.grad_hidden, ctx.grad_weight)]
        ctx.grad_hidden = ctx.grad_weight = None  # in place and handed over: a second backward has nothing left
        return grads[0], None if grads[1] is None else grads[1].to(ctx.weight_dtype), None, None


def chunked_mix(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Targets,
    mask: torch.Tensor,
    weights: dict[str, float | LossSetting],
    options: LossOptions,
) -> MixedLoss:
    """`mix` of the logits hidden @ weight^T ([N, H] @ [H, V]) with at most `options.chunk_tokens` rows of logits
    in memory (module docstring, Bounded memory); equal to `mix` on the full logits, gradients included."""
    parts: list[MixedLoss] = []

    def loss_of(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        part = mix(logits, targets[rows], mask[rows], weights, options)
        parts.append(part._replace(total=part.total.detach()))  # the chunk's graph goes once its grads are taken
        return part.total

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _ChunkedLoss.apply(hidden, weight, loss_of, options.chunk_tokens)
    else:
        total = _chunk_losses(hidden, weight, loss_of, options.chunk_tokens, (False, False))[0]
    terms = {name: (sum(p.terms[name][0] for p in parts), sum(p.terms[name][1] for p in parts)) for name in weights}
    return MixedLoss(total, sum(p.tokens for p in parts), terms)


class CausalLMLoss(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns `chunked_mix` at chosen positions instead of logits.

    The decoder (`base_model`) gives the final hidden states; the output layer's weight is read here, not through
    the output layer's forward, so with DeepSpeed ZeRO-3 it must be registered as an external parameter of this
    module (`deepspeed.zero.register_external_parameter`). The output layer must be a plain linear map: models
    that scale or soft-cap their logits are refused.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        config = lm.config.get_text_config()
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            raise ValueError(
                f"{type(lm).__name__} transforms its logits: the chunked loss supports a plain output layer"
            )
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        rows: torch.Tensor,
        targets: Targets,
        weights: dict[str, float | LossSetting],
        options: LossOptions,
    ) -> MixedLoss:
        """`chunked_mix` over the hidden states at `rows` ([B, L] bool, in order), all of them masked in."""
        hidden = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        return chunked_mix(hidden[rows], weight, targets, torch.ones_like(targets.distill), weights, options)
