"""Per-sample gradients of fedface's encoder and heads, exact and fast.

DP-SGD clips each example's gradient, so it needs one gradient per example. fedface splits
the model where that is cheapest to do:

- the GRUs (almost all the parameters and time): :class:`~fedface.common.privacy.gru.PerSampleGRU`
  keeps every step's gate gradients in a hand-written backward pass and turns them into
  per-sample weight gradients with batched matmuls;
- everything after them (the embedding neck and the head: LayerNorm, Linear, class centres):
  each layer's input and output gradient are captured in the same single backward pass, and
  its per-sample gradients follow in closed form (Opacus' formulas). A layer type without a
  formula here falls back to ``torch.func.vmap(grad(...))`` over single examples;
- the convolutional stem before them (Conv2d, GroupNorm), when the encoder has one: the same
  capture in the same backward pass (the GRUs' hand-written backward hands the gradient of
  their input sequence on to it), and Opacus' own per-sample formulas for those layers
  (``opacus.grad_sample.conv`` and ``group_norm``), called directly.

Examples of a batch never interact in these models (no batch statistics), so one backward
pass of the summed loss gives every example's own gradient at every activation.

The result is ``p.grad_sample`` (shape ``(N, *p.shape)``) on every trainable parameter, the
form Opacus' ``DPOptimizer`` clips, noises and accumulates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch.func import functional_call, grad, vmap

from fedface.common.models.encoder import GRUFaceEncoder
from fedface.common.models.heads import CosineClassifier, MarginHead
from fedface.common.privacy.clipping import Materialized, OuterSum, Term, average_copies, clip_and_sum, set_grad_samples
from fedface.common.privacy.gru import PerSampleGRU


class PerSampleFaceEncoder(GRUFaceEncoder):
    """A :class:`GRUFaceEncoder` whose GRUs are :class:`PerSampleGRU`; made by :func:`to_per_sample`.

    Passes whose GRUs and sequences have the same shape (rows and columns of a square face)
    run in one recurrence loop (:meth:`PerSampleGRU.forward_group`); outputs are unchanged.

    ``frozen_stem_precision = "bf16"`` (``training.precision``) runs a convolutional stem
    whose parameters are all frozen (``privacy.trainable`` "gru" or "neck") under bfloat16
    autocast while training, its features handed on in float32. No gradient is taken there,
    so the stem is a fixed feature extractor of each example: its precision changes the
    features, not what DP-SGD clips (every per-example gradient and norm stays float32 and
    exact). A trainable stem, and evaluation (``eval()`` mode), stay float32.
    """

    frozen_stem_precision: str = "fp32"

    def _run_stem(self, x: torch.Tensor) -> torch.Tensor:
        assert self.stem is not None
        if not self.training or stem_precision(self, x.device) != "bf16":
            return self.stem(x)
        # channels-last input: oneDNN's bf16 convolutions run about 1.2x faster on it (measured)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.stem(x.contiguous(memory_format=torch.channels_last))
        return out.float().contiguous()

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`GRUFaceEncoder.pooled`, with same-shaped passes grouped."""
        seqs = self.sequences(x)
        groups: dict[tuple[object, ...], list[str]] = {}
        for name in self.passes:
            g = self.rnns[name]
            key = (tuple(seqs[name].shape), g.input_size, g.hidden_size, g.num_layers, g.bidirectional)
            groups.setdefault(key, []).append(name)
        results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for names in groups.values():
            outs = PerSampleGRU.forward_group([self.rnns[n] for n in names], [seqs[n] for n in names])
            results.update(zip(names, outs, strict=True))
        return torch.cat([self._pool(*results[name]) for name in self.passes], dim=1)


def to_per_sample(encoder: GRUFaceEncoder, *, frozen_stem_precision: str = "fp32") -> PerSampleFaceEncoder:
    """A copy of ``encoder`` whose GRUs are :class:`PerSampleGRU` (same names and weights).

    Its ``state_dict`` loads into a plain :class:`GRUFaceEncoder` of the same config and back.
    ``frozen_stem_precision``: see :class:`PerSampleFaceEncoder`.
    """
    if frozen_stem_precision not in ("fp32", "bf16"):
        raise ValueError(f"frozen_stem_precision must be fp32 or bf16, got {frozen_stem_precision!r}")
    new = copy.deepcopy(encoder)
    for name, rnn in list(new.rnns.items()):
        if isinstance(rnn, nn.GRU):
            new.rnns[name] = PerSampleGRU.from_gru(rnn)
    # Same state, one method more: re-classing the copy avoids re-deriving the constructor's
    # arguments from a built encoder.
    new.__class__ = PerSampleFaceEncoder
    new.frozen_stem_precision = frozen_stem_precision  # type: ignore[attr-defined]
    return new  # type: ignore[return-value]


def stem_precision(encoder: nn.Module, device: torch.device | None = None) -> str | None:
    """The precision the convolutional stem of a DP-SGD ``encoder`` trains in: ``"bf16"`` for
    a wholly frozen stem of a :class:`PerSampleFaceEncoder` asked for it, on a device with
    bfloat16 (any CPU; a CUDA GPU that supports it), else ``"fp32"``; ``None`` without a stem.
    ``device``: where it runs (default: where its parameters are)."""
    stem = getattr(encoder, "stem", None)
    if stem is None:
        return None
    frozen = not any(p.requires_grad for p in stem.parameters())
    if not frozen or getattr(encoder, "frozen_stem_precision", "fp32") != "bf16":
        return "fp32"
    device = device if device is not None else next(stem.parameters()).device
    # torch turns autocast off (with a warning) on a GPU without bfloat16: say fp32 then
    return "fp32" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"


def _head_loss(
    head: nn.Module, params: dict[str, torch.Tensor], emb: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    args = (emb, y) if isinstance(head, MarginHead) else (emb,)
    logits = functional_call(head, params, args)
    return F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)


@dataclass(frozen=True)
class PerSampleOutput:
    """What a per-sample gradient pass also yields about the batch (detached)."""

    losses: torch.Tensor  # (N,) each example's loss (margin logits)
    predictions: torch.Tensor  # (N,) argmax of the margin-free logits


# Per-sample gradients of the layers after the GRUs, from each layer's input (activations) and
# the gradient at its output (backprops), the formulas Opacus' grad samplers use. Written here
# rather than through Opacus' GradSampleModule, which would wrap (and rename) the modules;
# functorch's vmap does the same job generically but costs several milliseconds of dispatch
# per step (it stays as the fallback for layer types not listed here).
def _linear_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> list[Term]:
    n = a.shape[0]
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    # (1, K, N, .): one weight, K positions per example
    terms: list[Term] = [OuterSum([m.weight], (g3.transpose(0, 1).unsqueeze(0),), a3.transpose(0, 1).unsqueeze(0))]  # type: ignore[list-item]
    if m.bias is not None:
        terms.append(Materialized([m.bias], g3.sum(dim=1).unsqueeze(0)))  # type: ignore[list-item]
    return terms


def _layer_norm_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> list[Term]:
    ln: nn.LayerNorm = m  # type: ignore[assignment]
    n = a.shape[0]
    dims = len(ln.normalized_shape)
    terms: list[Term] = []
    if ln.weight is not None:
        normed = F.layer_norm(a, ln.normalized_shape, eps=ln.eps)
        terms.append(Materialized([ln.weight], (g * normed).reshape(n, -1, *ln.normalized_shape).sum(dim=1).unsqueeze(0)))
    if ln.bias is not None:
        terms.append(Materialized([ln.bias], g.reshape(n, -1, *g.shape[-dims:]).sum(dim=1).unsqueeze(0)))
    return terms


def _cosine_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> list[Term]:
    # cos = normalize(e) . normalize(W)^T; for one example, d cos_c / d W_c is
    # (e_hat - W_hat_c * cos_c) / |W_c| (the row normalisation's Jacobian applied to e_hat).
    w = m.weight.detach()  # type: ignore[attr-defined]
    norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    w_hat = w / norms
    e_hat = F.normalize(a, dim=1)
    tangent = e_hat.unsqueeze(1) - w_hat.unsqueeze(0) * out.unsqueeze(2)  # (N, C, D)
    return [Materialized([m.weight], (g.unsqueeze(2) * tangent / norms.unsqueeze(0)).unsqueeze(0))]  # type: ignore[list-item]


_SAMPLERS = {nn.Linear: _linear_terms, nn.LayerNorm: _layer_norm_terms, CosineClassifier: _cosine_terms}


def _opacus_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> list[Term]:
    """The stem's layers: Opacus' per-sample formulas, as materialised terms."""
    if isinstance(m, nn.Conv2d):
        grads = compute_conv_grad_sample(m, [a], g)
    else:
        grads = compute_group_norm_grad_sample(m, [a], g)  # type: ignore[arg-type]
    return [Materialized([p], grads[p].unsqueeze(0)) for p in m.parameters(recurse=False) if p.requires_grad]  # type: ignore[list-item]


def _stem_layers(encoder: GRUFaceEncoder) -> list[nn.Module]:
    """The stem's layers with trainable parameters (none without a stem, or a frozen one)."""
    stem = getattr(encoder, "stem", None)
    if stem is None:
        return []
    layers = []
    for m in stem.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        flags = {p.requires_grad for p in own}
        if flags == {False}:
            continue
        if type(m) not in (nn.Conv2d, nn.GroupNorm) or flags != {True}:
            raise TypeError(f"per-sample gradients: no formula for a trainable {type(m).__name__} in the stem")
        layers.append(m)
    return layers


def _trainable_layers(*modules: nn.Module) -> list[nn.Module] | None:
    """The modules holding trainable parameters, or None if one has no sampler here."""
    layers = []
    for root in modules:
        for m in root.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(m) not in _SAMPLERS or len(own) != len(list(m.parameters(recurse=False))):
                return None
            layers.append(m)
    return layers


class _Capture:
    """Forward hooks that keep each listed layer's input, output and (later) output gradient."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.seen: dict[nn.Module, list[torch.Tensor]] = {}
        self.live: dict[nn.Module, torch.Tensor] = {}  # the outputs themselves, to differentiate to
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if m in self.seen:
            raise RuntimeError(f"per-sample gradients: {type(m).__name__} is called twice in one pass")
        entry = [inputs[0].detach(), out.detach()]
        self.seen[m] = entry
        self.live[m] = out
        if out.requires_grad:
            out.register_hook(lambda grad: entry.append(grad))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _after_grus_terms(
    encoder: GRUFaceEncoder,
    head: nn.Module,
    layers: list[nn.Module],
    pooled: torch.Tensor,
    y: torch.Tensor,
    targets: list[torch.Tensor],
    label_smoothing: float = 0.0,
) -> tuple[list[Term], torch.Tensor, torch.Tensor]:
    """One ordinary backward pass of the summed losses to ``targets``; the per-sample terms of
    the neck's and head's ``layers`` from their captured activations, the embeddings and the
    margin logits (detached)."""
    capture = _Capture(layers)
    try:
        emb = encoder.neck(pooled)
        logits = head(emb, y) if isinstance(head, MarginHead) else head(emb)
        loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
    finally:
        capture.remove()
    torch.autograd.grad(loss, targets)
    terms: list[Term] = []
    for m in layers:
        a, out, g = capture.seen[m]
        terms += _SAMPLERS[type(m)](m, a, g, out)
    return terms, emb.detach(), logits.detach()


def _after_grus_terms_vmap(
    encoder: GRUFaceEncoder, head: nn.Module, pooled: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[list[Term], torch.Tensor]:
    """The generic route: ``vmap(grad(...))`` over single examples; also returns d loss / d pooled."""
    neck_params = {k: v.detach() for k, v in encoder.neck.named_parameters()}
    head_params = {k: v.detach() for k, v in head.named_parameters()}

    def loss_one(npar: dict[str, torch.Tensor], hpar: dict[str, torch.Tensor], zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        emb = functional_call(encoder.neck, npar, (zi.unsqueeze(0),))
        return _head_loss(head, hpar, emb, yi.unsqueeze(0), label_smoothing)

    per_sample = vmap(grad(loss_one, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0), randomness="different")
    g_neck, g_head, d_pooled = per_sample(neck_params, head_params, pooled.detach(), y)
    terms: list[Term] = []
    for module, grads in ((encoder.neck, g_neck), (head, g_head)):
        for name, p in module.named_parameters():
            if p.requires_grad:
                terms.append(Materialized([p], grads[name].unsqueeze(0)))  # type: ignore[list-item]
    return terms, d_pooled


def per_sample_terms(
    encoder: GRUFaceEncoder, head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0
) -> tuple[list[Term], PerSampleOutput]:
    """Every trainable parameter's per-example gradients for the batch, as clipping terms.

    The loss of an example is its cross-entropy on the head's (margin) logits (with
    ``label_smoothing``, as ``F.cross_entropy`` defines it). ``encoder``
    must hold :class:`PerSampleGRU` modules (see :func:`to_per_sample`). Frozen parameters
    (``requires_grad`` False, e.g. GRUs kept fixed while fine-tuning the neck) get none, and
    frozen GRUs cost no per-sample work. One forward and one backward pass: the examples of
    a batch do not interact (no batch statistics), so the gradient of the summed loss at any
    example's activations is that example's own.
    """
    grus = [m for m in encoder.rnns.values() if isinstance(m, PerSampleGRU)]
    if len(grus) != len(encoder.rnns):
        raise TypeError("per-sample gradients need an encoder prepared with to_per_sample()")
    live = []
    for g in grus:
        flags = {p.requires_grad for p in g.parameters()}
        if len(flags) > 1:
            raise ValueError("per-sample gradients: freeze a GRU whole or not at all")
        if flags == {True}:
            live.append(g)
    layers = _trainable_layers(encoder.neck, head)
    stem_layers = _stem_layers(encoder)
    if stem_layers and not live:
        raise ValueError("per-sample gradients: a trainable stem under frozen GRUs is not supported; freeze the stem too")
    stem_capture = _Capture(stem_layers) if stem_layers else None
    for g in live:
        g.record(True)
    try:
        try:
            if live:
                pooled = encoder.pooled(x)
            else:
                with torch.no_grad():
                    pooled = encoder.pooled(x)
        finally:
            if stem_capture is not None:
                stem_capture.remove()
        # the backward pass must reach the stem's first layer: its output joins the targets
        stem_targets = [stem_capture.live[stem_layers[0]]] if stem_capture is not None else []
        emb: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        if layers is not None:
            if live:
                source, targets = pooled, [t for g in live for t in g.probes] + stem_targets
            else:  # frozen GRUs: differentiate to the pooled features only
                source = pooled.detach().requires_grad_(True)
                targets = [source]
            terms, emb, logits = _after_grus_terms(encoder, head, layers, source, y, targets, label_smoothing)
        else:
            terms, d_pooled = _after_grus_terms_vmap(encoder, head, pooled, y, label_smoothing)
            if live:
                torch.autograd.grad(pooled, [t for g in live for t in g.probes] + stem_targets, grad_outputs=d_pooled)
        for g in live:
            terms += g.per_sample_terms()
        if stem_capture is not None:
            for m in stem_layers:
                a, _, g_out = stem_capture.seen[m]
                terms += _opacus_terms(m, a, g_out)
    finally:
        for g in live:
            g.record(False)
    with torch.no_grad():
        if emb is None or logits is None:
            emb = encoder.neck(pooled.detach())
            logits = head(emb, y) if isinstance(head, MarginHead) else head(emb)
        losses = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
        plain = head(emb) if isinstance(head, MarginHead) else logits
    return terms, PerSampleOutput(losses=losses, predictions=plain.argmax(dim=1))


def _check_copies(y: torch.Tensor, copies: int) -> None:
    """Copy-major inputs repeat the batch's labels ``copies`` times; anything else would mix
    examples (one example could then reach several clipped gradients)."""
    if copies == 1:
        return
    if y.shape[0] % copies or not bool((y.view(copies, -1) == y[: y.shape[0] // copies]).all()):
        raise ValueError(f"copies={copies}: the inputs must be {copies} copy-major repeats of the batch (labels y.repeat({copies}))")


def _of_examples(out: PerSampleOutput, copies: int) -> PerSampleOutput:
    """The output for ``N * copies`` copy-major inputs as one per example: the mean loss over
    its copies, the prediction on its first copy."""
    if copies == 1:
        return out
    n = out.losses.shape[0] // copies
    return PerSampleOutput(losses=out.losses.view(copies, n).mean(dim=0), predictions=out.predictions[:n])


def compute_grad_samples(
    encoder: GRUFaceEncoder, head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0, copies: int = 1
) -> PerSampleOutput:
    """Set ``p.grad_sample`` (N, *p.shape) on every trainable parameter (see :func:`per_sample_terms`).

    The per-example gradients themselves, the form Opacus' ``DPOptimizer`` clips; DP-SGD in
    fedface uses :func:`clip_grad_samples`, which does not form them where it need not.
    With ``copies`` > 1, ``x`` and ``y`` hold ``copies`` augmentations of each of N examples,
    copy-major, and each example's gradient is the mean of its copies'
    (:func:`~fedface.common.privacy.clipping.average_copies`).
    """
    _check_copies(y, copies)
    terms, out = per_sample_terms(encoder, head, x, y, label_smoothing=label_smoothing)
    set_grad_samples(average_copies(terms, copies))
    return _of_examples(out, copies)


def clip_grad_samples(
    encoder: GRUFaceEncoder,
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    *,
    label_smoothing: float = 0.0,
    copies: int = 1,
) -> tuple[PerSampleOutput, torch.Tensor]:
    """Clip each example's gradient to ``max_grad_norm`` and leave their sum in ``p.grad``.

    Returns the batch's losses and predictions, and each example's gradient norm before
    clipping. ``p.grad`` is what Opacus' ``DPOptimizerFastGradientClipping`` noises. With
    ``copies`` > 1 (augmentation multiplicity), ``x`` and ``y`` hold ``copies`` augmentations of
    each example, copy-major; an example's gradient is the mean of its copies', clipped once.
    """
    _check_copies(y, copies)
    terms, out = per_sample_terms(encoder, head, x, y, label_smoothing=label_smoothing)
    norms = clip_and_sum(average_copies(terms, copies), max_grad_norm)
    return _of_examples(out, copies), norms


__all__ = [
    "PerSampleFaceEncoder",
    "PerSampleOutput",
    "clip_grad_samples",
    "compute_grad_samples",
    "per_sample_terms",
    "stem_precision",
    "to_per_sample",
]
