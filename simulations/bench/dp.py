"""`fedface bench dp`: the cost of a DP-SGD training step, fedface's against Opacus' ``DPGRU``.

In one run, on a batch of real ORL faces, with the baseline encoder (or ``--config``'s) and a
CosFace head over ORL's 40 identities, it times one full training step (forward, backward,
optimizer step) three ways:

- ``nonprivate``: the encoder with ``nn.GRU`` (fused kernels), plain AdamW: the ceiling;
- ``fedface_dp``: fedface's DP-SGD: exact per-example gradients from
  :class:`~fedface.common.privacy.gru.PerSampleGRU`, clipped, noised and applied by Opacus'
  ``DPOptimizer`` (and once more with ``secure_mode``);
- ``opacus_dpgru``: Opacus' own route: ``ModuleValidator.fix`` swaps in ``DPGRU``, a
  ``GradSampleModule`` computes per-example gradients with hooks, the same ``DPOptimizer``;
- ``fedface_dp_fp32_stem``, only for a config whose convolutional stem is frozen
  (``privacy.trainable`` "gru" or "neck") with ``training.precision = "bf16"``: fedface's DP
  step with the stem in float32, the baseline of ``bf16_stem_speedup`` (``fedface_dp`` runs
  such a stem in bfloat16, as training does).

Every variant trains the parameters ``privacy.trainable`` leaves trainable, and the
non-private step runs under ``training.precision`` as non-private training does.

The variants take turns (``--repeats`` rounds of ``--steps`` steps each, after warm-up), so
drifts of a shared machine hit them alike; the figure of each is the median over rounds of the
mean step time. Peak memory of each variant is measured in a fresh process of its own
(warm-up and a few steps; on CUDA also its peak GPU memory). ``--device`` picks CPU or CUDA
(CUDA when present, by default). The last stdout line is one JSON object.
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from fedface.common.config import TrainConfig
from fedface.common.data import load_faces, to_tensor
from fedface.common.models import MarginHead, build_encoder, build_margin_head, freeze_for
from fedface.common.privacy.dpsgd import dp_step, make_dp_optimizer
from fedface.common.privacy.per_sample import to_per_sample
from fedface.common.training import autocast, select_device
from fedface.simulations.bench.common import peak_rss_mb, process_peak_mb, scenario_config
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

VARIANTS = ("nonprivate", "fedface_dp", "fedface_dp_secure", "opacus_dpgru")

Step = Callable[[], None]


class _EncoderWithMargin(nn.Module):
    """Encoder and margin head as one module (Opacus' GradSampleModule wraps a single module)."""

    def __init__(self, encoder: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x), y)


def _batch(cfg: TrainConfig, orl: Path, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    faces = load_faces(orl, size=cfg.data.image_size)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(faces), size=batch_size, replace=batch_size > len(faces))
    return to_tensor(faces.images[idx]).clone(), torch.from_numpy(faces.labels[idx]).clone(), faces.num_identities


def _trained(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def variants(cfg: TrainConfig) -> tuple[str, ...]:
    """The variants timed for ``cfg``: with a frozen stem and ``training.precision = "bf16"``
    also ``fedface_dp_fp32_stem`` (the same DP step with the stem in float32), the baseline of
    the bf16 stem's speed-up."""
    if cfg.model.stem and cfg.privacy.trainable in ("gru", "neck") and cfg.training.precision == "bf16":
        return (*VARIANTS, "fedface_dp_fp32_stem")
    return VARIANTS


def _make_step(name: str, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, classes: int) -> Step:
    """A closure running one training step of variant ``name`` (fresh models, same init), on ``x``'s device."""
    torch.manual_seed(cfg.training.seed)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size).to(x.device)
    freeze_for(cfg.privacy.trainable, encoder)  # every variant trains the same parameters
    head = build_margin_head(cfg.head, embedding_dim=cfg.model.embedding_dim, num_classes=classes).to(x.device)
    lr, wd = cfg.training.lr, cfg.training.weight_decay
    batch = len(x)
    if name == "nonprivate":
        opt = torch.optim.AdamW(_trained(encoder, head), lr=lr, weight_decay=wd)

        def nonprivate() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(x.device, cfg.training.precision):  # as non-private training runs
                loss = F.cross_entropy(head(encoder(x), y).float(), y)
            loss.backward()
            opt.step()

        return nonprivate
    if name in ("fedface_dp", "fedface_dp_secure", "fedface_dp_fp32_stem"):
        stem = "fp32" if name == "fedface_dp_fp32_stem" else cfg.training.precision
        private = to_per_sample(encoder, frozen_stem_precision=stem)
        freeze_for(cfg.privacy.trainable, private)  # PerSampleGRU's parameters are new: freeze them again
        base = torch.optim.AdamW(_trained(private, head), lr=lr, weight_decay=wd)
        dp_opt = make_dp_optimizer(
            base,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            secure_mode=name == "fedface_dp_secure",
            generator=torch.Generator(device=x.device).manual_seed(0),
        )

        def fedface_dp() -> None:
            dp_step(private, head, dp_opt, x, y)

        return fedface_dp
    if name == "opacus_dpgru":
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        model = GradSampleModule(ModuleValidator.fix(_EncoderWithMargin(copy.deepcopy(encoder), head)))
        base = torch.optim.AdamW(_trained(model), lr=lr, weight_decay=wd)
        dp_opt = make_dp_optimizer(
            base,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            generator=torch.Generator(device=x.device).manual_seed(0),
            presummed=False,  # Opacus' hooks fill p.grad_sample; its DPOptimizer clips
        )

        def opacus_dpgru() -> None:
            dp_opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, y), y).backward()
            dp_opt.step()

        return opacus_dpgru
    raise ValueError(f"unknown variant {name!r}")


def _quiet_opacus_hooks() -> None:
    # DPGRU feeds its zero initial state (no grad) through a hooked layer; torch warns each step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def _memory_probe(
    name: str, cfg_toml: dict[str, Any], orl: str, batch_size: int, threads: int, steps: int, device: str
) -> tuple[float, float]:
    """Peak RSS and peak CUDA memory (MiB; 0 on CPU) of a fresh process that builds variant
    ``name`` and runs a few steps."""
    torch.set_num_threads(threads)
    _quiet_opacus_hooks()
    cfg = TrainConfig.from_mapping(cfg_toml)
    x, y, classes = _batch(cfg, Path(orl), batch_size, cfg.training.seed)
    dev = torch.device(device)
    step = _make_step(name, cfg, x.to(dev), y.to(dev), classes)
    for _ in range(steps):
        step()
    gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
    return process_peak_mb(), gpu


def dp(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Training config whose \\[model] and \\[head] are timed (default: the baseline scenario).")] = None,
    orl: Annotated[Path, typer.Option(help="ORL faces directory (the batch is drawn from it).")] = Path("../shared/data/orl"),
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Steps per timed round.")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed rounds per variant (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps per variant first.")] = 3,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 1,
    memory: Annotated[bool, typer.Option(help="Also measure each variant's peak memory in a process of its own.")] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Seconds per training step: non-private nn.GRU vs fedface's DP-SGD vs Opacus DPGRU hooks."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    _quiet_opacus_hooks()
    with user_errors():
        cfg = TrainConfig.from_toml(config) if config is not None else scenario_config("baseline.toml")
        x, y, classes = _batch(cfg, orl, batch_size, cfg.training.seed)
        dev = select_device(device)
    x, y = x.to(dev), y.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    m = cfg.model
    err_console.print(
        f"encoder: passes {'+'.join(m.passes)}, hidden {m.hidden_size} x {m.num_layers} layer(s)"
        f"{', bidirectional' if m.bidirectional else ''}, faces {cfg.data.image_size[0]}x{cfg.data.image_size[1]}"
        f" read at 1/{m.downsample}; batch {batch_size}; {dev.type}" + (f", {threads} CPU thread(s)" if dev.type == "cpu" else "")
    )
    names = variants(cfg)
    steps_fns = {name: _make_step(name, cfg, x, y, classes) for name in names}
    for fn in steps_fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name, fn in steps_fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()  # CUDA runs asynchronously: a step is done when the device is
            times[name].append((time.perf_counter() - start) / steps)
        err_console.print(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1] * 1000:.1f} ms" for n in names))
    med = {name: statistics.median(v) for name, v in times.items()}
    result: dict[str, Any] = {
        "bench": "dp",
        "nonprivate_step_s": med["nonprivate"],
        "fedface_dp_step_s": med["fedface_dp"],
        "fedface_dp_secure_step_s": med["fedface_dp_secure"],
        "opacus_dpgru_step_s": med["opacus_dpgru"],
        "dp_over_nonprivate": med["fedface_dp"] / med["nonprivate"],
        "secure_over_nonprivate": med["fedface_dp_secure"] / med["nonprivate"],
        "opacus_over_fedface": med["opacus_dpgru"] / med["fedface_dp"],
        "opacus_over_nonprivate": med["opacus_dpgru"] / med["nonprivate"],
        "trainable": cfg.privacy.trainable,
        "precision": cfg.training.precision,
        "batch_size": batch_size,
        "device": dev.type,
        "threads": threads,
        "repeats": repeats,
        "steps_per_repeat": steps,
        "step_s_all": {name: v for name, v in times.items()},
    }
    if "fedface_dp_fp32_stem" in med:
        result["fedface_dp_fp32_stem_step_s"] = med["fedface_dp_fp32_stem"]
        result["bf16_stem_speedup"] = med["fedface_dp_fp32_stem"] / med["fedface_dp"]
    if memory:
        ctx = multiprocessing.get_context("spawn")
        cfg_toml = cfg.to_toml_dict()
        peaks = {}
        for name in names:
            # one fresh process per variant, one at a time: its peak is its own
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                peaks[name] = pool.submit(_memory_probe, name, cfg_toml, str(orl), batch_size, threads, warmup + 2, str(dev)).result()
        result.update({f"{name}_peak_mb": peaks[name][0] for name in names})
        if dev.type == "cuda":
            result.update({f"{name}_cuda_peak_mb": peaks[name][1] for name in names})
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    err_console.print(
        f"step: non-private {med['nonprivate'] * 1000:.1f} ms, fedface DP {med['fedface_dp'] * 1000:.1f} ms "
        f"({result['dp_over_nonprivate']:.2f}x), Opacus DPGRU {med['opacus_dpgru'] * 1000:.1f} ms "
        f"({result['opacus_over_fedface']:.1f}x fedface's)"
    )
    print_json(result)


__all__ = ["dp"]
