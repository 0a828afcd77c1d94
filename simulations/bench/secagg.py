"""`fedface bench secagg`: what fedface's ChaCha20 SecAgg+ masks cost against Flower's own generator.

Every SecAgg+ round, each site expands one private mask and one pairwise mask per neighbour
over the whole masked vector (the model's shared arrays and the weight factor), and the server
expands every answering site's private mask again to unmask the sum (and a dropped site's
pairwise masks, one per neighbour). Both generators are timed on the same arrays in the same
process, alternately, for the models of the packaged federated scenarios; the figures are the
medians. The round figures multiply the per-mask time by the number of masks a round expands
at each scenario's defaults (``fedface.server.secagg.secagg_workflow``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Annotated

import torch
import typer
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_generator

from fedface.common.config import TrainConfig
from fedface.common.crypto.masks import mask_arrays
from fedface.common.models import ExpressionHead, build_encoder, shared_weights
from fedface.simulations.bench.common import peak_rss_mb, scenario_config
from fedface.simulations.console import err_console, print_json, setup_logging

SCENARIOS = ("federated.toml", "fer2013_federated.toml")
MOD_RANGE = 2**32  # Flower's default modulus (fedface keeps it)


def _shapes(cfg: TrainConfig) -> list[tuple[int, ...]]:
    """The masked vector of ``cfg``'s federation: the weight factor, then the shared arrays."""
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, image_size=cfg.data.image_size)
    head = ExpressionHead(cfg.model.embedding_dim, 7) if cfg.training.task == "expression" else None
    return [(1,), *(a.shape for a in shared_weights(encoder, head))]


def _neighbours(sites: int) -> int:
    """Pairwise masks per site at fedface's defaults: every other sampled site up to 10 sites;
    beyond, 10 shares, which Flower makes odd (11: the site and 10 neighbours)."""
    return sites - 1 if sites <= 10 else 10


def secagg(
    repeats: Annotated[int, typer.Option(help="Timed expansions per generator and model (the median is reported).")] = 7,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log detail.")] = 0,
) -> None:
    """Seconds per SecAgg+ mask and per round: fedface's ChaCha20 masks against Flower's Mersenne Twister."""
    setup_logging(verbose, quiet=not verbose)
    t0 = time.perf_counter()
    out: dict[str, object] = {"repeats": repeats}
    for name in SCENARIOS:
        cfg = scenario_config(name)
        shapes = _shapes(cfg)
        values = sum(math.prod(s) for s in shapes)
        times: dict[str, list[float]] = {"flower": [], "fedface": []}
        for _ in range(repeats):
            for label, generate in (("flower", flower_generator), ("fedface", mask_arrays)):
                seed = os.urandom(32)
                start = time.perf_counter()
                generate(seed, MOD_RANGE, shapes)
                times[label].append(time.perf_counter() - start)
        flower_s, fedface_s = statistics.median(times["flower"]), statistics.median(times["fedface"])
        sites = cfg.federation.sites
        k = _neighbours(sites)
        key = name.removesuffix(".toml")
        out[key] = {
            "masked_values": values,
            "sites": sites,
            "neighbours": k,
            "flower_mask_s": flower_s,
            "fedface_mask_s": fedface_s,
            "fedface_over_flower": fedface_s / flower_s,
            # a site: its private mask and one per neighbour; the server: every site's private mask
            "site_round_masks_s": {"flower": (k + 1) * flower_s, "fedface": (k + 1) * fedface_s},
            "server_round_masks_s": {"flower": sites * flower_s, "fedface": sites * fedface_s},
        }
        err_console.print(
            f"{key}: {values:,} masked values, {k} neighbours: one mask {flower_s * 1e3:.1f} ms (Flower) vs "
            f"{fedface_s * 1e3:.1f} ms (fedface, x{fedface_s / flower_s:.2f}); a site's masks per round "
            f"{(k + 1) * flower_s:.3f} s vs {(k + 1) * fedface_s:.3f} s"
        )
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    print_json(out)


__all__ = ["secagg"]
