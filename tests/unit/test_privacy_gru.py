"""PerSampleGRU: nn.GRU's outputs, and per-sample gradients equal to a per-example loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedface.common.data import load_faces, to_tensor
from fedface.common.privacy import PerSampleGRU

CASES = [(1, False), (1, True), (2, True)]


@pytest.fixture(scope="module")
def face_rows(orl_root: Path) -> torch.Tensor:
    faces = load_faces(orl_root, size=(16, 16))
    # 5 real faces read as sequences of 16 rows of 16 pixels, float64 for an exact comparison
    return to_tensor(faces.images[::80][:5])[:, 0].double()


@pytest.mark.parametrize(("layers", "bidirectional"), CASES)
def test_per_sample_gru_matches_nn_gru_outputs_and_state_dict(face_rows: torch.Tensor, layers: int, bidirectional: bool) -> None:
    torch.manual_seed(0)
    reference = nn.GRU(16, 6, num_layers=layers, batch_first=True, bidirectional=bidirectional).double()

    gru = PerSampleGRU.from_gru(reference)
    out, h_n = gru(face_rows)

    ref_out, ref_h = reference(face_rows)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-12, rtol=0)
    assert gru.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(gru.state_dict())  # and back: same names, same shapes


@pytest.mark.parametrize(("layers", "bidirectional"), CASES)
def test_per_sample_gru_grad_samples_equal_per_example_backward(face_rows: torch.Tensor, layers: int, bidirectional: bool) -> None:
    torch.manual_seed(1)
    gru = PerSampleGRU(16, 6, layers, bidirectional=bidirectional).double()
    weights = torch.randn(6 * (2 if bidirectional else 1), dtype=torch.float64)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        out, h_n = gru(x)
        return (out.amax(dim=1) * weights).sum() + (out.mean(dim=1) ** 2).sum() + h_n.sum()

    gru.record(True)
    torch.autograd.grad(loss_of(face_rows), gru.probes)
    gru.compute_grad_samples()
    gru.record(False)

    for i in range(face_rows.shape[0]):
        gru.zero_grad(set_to_none=True)
        loss_of(face_rows[i : i + 1]).backward()
        for name, p in gru.named_parameters():
            assert p.grad_sample.shape == (face_rows.shape[0], *p.shape), name
            torch.testing.assert_close(p.grad_sample[i], p.grad, atol=1e-10, rtol=0, msg=name)


def test_per_sample_gru_grad_samples_need_a_recorded_forward_and_backward() -> None:
    gru = PerSampleGRU(4, 3)
    with pytest.raises(RuntimeError, match="record"):
        gru.compute_grad_samples()
    gru.record(True)
    gru(torch.randn(2, 5, 4))
    with pytest.raises(RuntimeError, match="differentiate the loss to the probes first"):
        gru.compute_grad_samples()


@pytest.mark.parametrize("frozen_grus", [False, True], ids=["all", "neck-only"])
@pytest.mark.parametrize("head_kind", ["cosface", "arcface", "expression", "expression-hidden", "prelu-fallback"])
def test_compute_grad_samples_equal_per_example_backward_for_encoder_and_head(orl_root: Path, head_kind: str, frozen_grus: bool) -> None:
    import torch.nn.functional as F

    from fedface.common.models import ExpressionHead, GRUFaceEncoder, MarginHead
    from fedface.common.privacy.per_sample import compute_grad_samples, to_per_sample

    faces = load_faces(orl_root, size=(16, 16))
    x = to_tensor(faces.images[:40:8]).double()  # 5 real faces of identities s1..s5 (10 images each)
    y = torch.tensor([0, 0, 1, 1, 2])
    torch.manual_seed(2)
    encoder = to_per_sample(GRUFaceEncoder(image_size=(16, 16), hidden_size=6, embedding_dim=8, downsample=1).double())
    head: nn.Module = {
        "cosface": lambda: MarginHead.cosface(8, 3, scale=8.0),
        "arcface": lambda: MarginHead.arcface(8, 3, scale=8.0),
        "expression": lambda: ExpressionHead(8, 3),
        "expression-hidden": lambda: ExpressionHead(8, 3, hidden=5),
        # PReLU has no closed-form sampler in fedface: the generic vmap route must agree too
        "prelu-fallback": lambda: nn.Sequential(nn.Linear(8, 5), nn.PReLU(), nn.Linear(5, 3)),
    }[head_kind]().double()
    if frozen_grus:  # privacy.trainable = "neck": the GRUs stay fixed and get no per-sample work
        for p in encoder.rnns.parameters():
            p.requires_grad_(False)

    losses = compute_grad_samples(encoder, head, x, y).losses

    params = list(encoder.named_parameters()) + list(head.named_parameters())
    for i in range(5):
        encoder.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        emb = encoder(x[i : i + 1])
        logits = head(emb, y[i : i + 1]) if isinstance(head, MarginHead) else head(emb)
        loss = F.cross_entropy(logits, y[i : i + 1])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), abs=1e-10)
        for name, p in params:
            if frozen_grus and name.startswith("rnns."):
                assert p.grad is None and getattr(p, "grad_sample", None) is None, name
                continue
            torch.testing.assert_close(p.grad_sample[i], p.grad, atol=1e-10, rtol=0, msg=name)
