"""A short check of fedface on a CUDA GPU: exact DP-SGD gradients there, and a private training run.

Usage (on a machine with CUDA and fedface installed)::

    python scripts/gpu_check.py --data ../shared/data/orl [--out DIR]

1. Per-example gradients and the clipped sum of one DP-SGD step, computed on the GPU in float32
   for a 2-layer encoder (rows and patches, bidirectional) with a CosFace head, against the
   exact (float64, CPU) per-example gradients of a per-example loop: the largest difference must
   be at most 1e-5 relative to the largest gradient and no more than twice that of float32
   autograd's own per-example loop on the GPU; the clipped sum within 1e-5.
2. ``fedface train --epsilon 8 --device cuda`` for a few epochs: the run must say it trained on
   CUDA, and its ledger must hold the charge.
3. Two federated rounds of one site (what a SuperNode runs: DP-SGD charged to its ledger,
   FedProx, its head kept on disk) on the GPU it picks by itself.

Prints one JSON object as the last line; exits non-zero if a check fails. The speed figures come
from ``fedface bench dp --device cuda`` (run it beside this script).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def gradient_check(data: Path, device: str = "cuda") -> dict[str, float]:
    from fedface.common.data import load_faces, to_tensor
    from fedface.common.models import GRUFaceEncoder, MarginHead, prepare_for_dp
    from fedface.common.privacy.per_sample import clip_grad_samples, compute_grad_samples

    faces = load_faces(data, size=(32, 32))
    idx = [i for k in range(4) for i in (faces.labels == k).nonzero()[0][:3]]
    x = to_tensor(faces.images[idx])
    y = torch.as_tensor(faces.labels[idx])
    torch.manual_seed(0)
    encoder = prepare_for_dp(
        GRUFaceEncoder(image_size=(32, 32), passes=("rows", "patches"), hidden_size=64, num_layers=2, embedding_dim=32, patch_size=8)
    )
    head = MarginHead.cosface(32, 4, scale=16.0)
    exact_enc, exact_head = copy.deepcopy(encoder).double(), copy.deepcopy(head).double()
    params = list(exact_enc.parameters()) + list(exact_head.parameters())
    exact = []
    for i in range(len(x)):
        loss = F.cross_entropy(exact_head(exact_enc(x[i : i + 1].double()), y[i : i + 1]), y[i : i + 1], reduction="sum")
        exact.append(torch.autograd.grad(loss, params))

    dev = torch.device(device)
    # float32 autograd's own error: the same per-example loop in float32 on the device
    f32_enc, f32_head = copy.deepcopy(encoder).to(dev), copy.deepcopy(head).to(dev)
    f32_params = list(f32_enc.parameters()) + list(f32_head.parameters())
    f32_loop = 0.0
    for i in range(len(x)):
        xi, yi = x[i : i + 1].to(dev), y[i : i + 1].to(dev)
        grads = torch.autograd.grad(F.cross_entropy(f32_head(f32_enc(xi), yi), yi, reduction="sum"), f32_params)
        f32_loop = max(f32_loop, *(float((g.double().cpu() - e).abs().max()) for g, e in zip(grads, exact[i], strict=True)))
    gpu_enc, gpu_head = encoder.to(dev), head.to(dev)
    compute_grad_samples(gpu_enc, gpu_head, x.to(dev), y.to(dev))
    gpu_params = list(gpu_enc.parameters()) + list(gpu_head.parameters())
    per_example = max(
        float((p.grad_sample[i].detach().double().cpu() - exact[i][k]).abs().max())
        for k, p in enumerate(gpu_params)
        for i in range(len(x))
    )
    largest = max(float(g.abs().max()) for grads in exact for g in grads)
    # the clipped sum, against clipping the exact per-example gradients
    clip = 1.0
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in exact])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(factors[i] * exact[i][k] for i in range(len(x))) for k in range(len(params))]
    for p in gpu_params:
        p.grad = None
    clip_grad_samples(gpu_enc, gpu_head, x.to(dev), y.to(dev), clip)
    clipped = max(float((p.grad.detach().double().cpu() - e).abs().max()) for p, e in zip(gpu_params, expected, strict=True))
    return {
        "per_example_max_abs_diff": per_example,
        "float32_loop_max_abs_diff": f32_loop,
        "largest_exact_gradient": largest,
        "clipped_sum_max_abs_diff": clipped,
        "clipped_examples": int((factors < 1).sum()),
    }


def training_check(data: Path, out: Path) -> dict[str, object]:
    run_dir = out / "train"
    ledger = out / "ledger.sqlite"
    cmd = [
        sys.executable, "-c", "from fedface.simulations.cli import main; main()",
        "train", "-c", str(Path(__file__).resolve().parents[1] / "simulations" / "scenarios" / "baseline.toml"),
        "--data", str(data), "--epochs", "5", "--epsilon", "8", "--device", "cuda",
        "--ledger", str(ledger), "--out", str(run_dir), "--format", "json", "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"gpu check: fedface train failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    trained_on = json.loads((run_dir / "metrics.json").read_text()).get("device")
    return {"train_final": final, "train_device": trained_on}


def site_round_check(data: Path, out: Path) -> dict[str, object]:
    """Two federated rounds of one site (DP-SGD, FedProx) on the GPU, as a SuperNode runs them."""
    from fedface.client.site import Site
    from fedface.common.data import load_faces
    from fedface.common.models import build_encoder, encoder_weights
    from fedface.simulations.bench.common import scenario_config

    cfg = scenario_config("federated.toml").with_overrides({"training.device": "auto"})
    faces = load_faces(data, size=cfg.data.image_size)
    mine = faces.subset((faces.labels < 3).nonzero()[0])  # three people, as a site of the default scenario
    site = Site("gpu-site", cfg, mine, out / "site", out / "site" / "ledger.sqlite")
    weights = encoder_weights(build_encoder(cfg.model, image_size=cfg.data.image_size))
    results = []
    for r in (1, 2):
        res = site.train_round(weights, run_id="gpu-check", round_=r, rounds=2, local_epochs=2, lr=cfg.training.lr, proximal_mu=0.01)
        weights = res.weights
        results.append(res)
    moved = max(float(abs(a - b).max()) for a, b in zip(results[0].weights, results[1].weights, strict=True))
    return {
        "site_device": str(site.device),
        "site_examples": [r.examples for r in results],
        "site_epsilon": [r.metrics.get("epsilon") for r in results],
        "site_weights_moved": moved,
        "site_head_kept": (out / "site" / "head.pt").exists() or any((out / "site").rglob("head.pt")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/orl"), help="ORL faces directory")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="where the training run and its ledger go")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu check: CUDA is not available on this machine; run it where a GPU is", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    result.update(gradient_check(args.data))
    result.update(training_check(args.data, args.out))
    result.update(site_round_check(args.data, args.out))
    # fedface's float32 per-example gradients are within 1e-5 of the exact ones relative to the
    # largest gradient, and no further off than float32 autograd's own per-example loop (x2)
    tolerance = 1e-5 * max(1.0, result["largest_exact_gradient"])  # type: ignore[arg-type]
    ok = (
        result["per_example_max_abs_diff"] <= min(tolerance, 2 * result["float32_loop_max_abs_diff"] + 1e-7)  # type: ignore[operator]
        and result["clipped_sum_max_abs_diff"] <= 1e-5  # type: ignore[operator]
        and result["train_device"] == "cuda"
        and str(result["site_device"]).startswith("cuda")
        and all(e > 0 for e in result["site_examples"])  # type: ignore[attr-defined]
        and all(e is not None and 0 < e <= 8.0 for e in result["site_epsilon"])  # type: ignore[attr-defined]
    )
    result["ok"] = bool(ok)
    print(json.dumps(result, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
