"""The coordinate networks of DVT Stage 1: shapes, hashing, and the hand-written gradient of the grid lookup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sinkless.denoise.field import FourierField, HashGridField, make_field


def test_shapes_and_range():
    coords = torch.rand(5, 7, 2)
    for field in (HashGridField(12, levels=4, finest=32), FourierField(12, frequencies=8, hidden=16)):
        assert field(coords).shape == (5, 7, 12)
    with pytest.raises(ValueError, match="unknown field"):
        make_field("nerf", 4)


def test_hashed_levels_stay_inside_their_table():
    field = HashGridField(4, levels=6, base=4, finest=512, log2_table=10)
    assert not bool(field.dense.all()) and bool(field.dense[0])  # coarse levels dense, fine levels hashed
    torch.manual_seed(0)
    coords = torch.rand(4096, 2)
    out = field.encode(coords)
    assert torch.isfinite(out).all() and out.shape == (4096, 6 * 4)


def test_lookup_gradient_matches_autograd_of_embedding():
    torch.manual_seed(0)
    field = HashGridField(8, levels=5, features=3, base=2, finest=128, log2_table=8)
    coords = torch.rand(300, 2)
    field.table.data.normal_()
    out = field.encode(coords)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    mine = field.table.grad.clone()

    # the same lookup written with F.embedding, differentiated by autograd
    table = field.table.detach().clone().requires_grad_(True)
    res = field.res.float()
    pos = coords[:, None, :] * res[None, :, None]
    cell = torch.minimum(pos.floor(), (res - 1)[None, :, None])
    frac = pos - cell
    vertex = cell.long()[:, :, None, :] + field.corners[None, None]
    ix, iy = vertex[..., 0], vertex[..., 1]
    index = torch.where(field.dense[None, :, None], ix + iy * (field.res + 1)[None, :, None],
                        torch.bitwise_xor(ix, iy * 2654435761) % field.sizes[None, :, None]) + field.offsets[None, :, None]
    dx, dy = field.corners[:, 0].float(), field.corners[:, 1].float()
    weight = (dx * frac[..., :1] + (1 - dx) * (1 - frac[..., :1])) * (dy * frac[..., 1:] + (1 - dy) * (1 - frac[..., 1:]))
    reference = (F.embedding(index, table) * weight[..., None]).sum(2).reshape(300, -1)
    (reference * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    print(f"forward max diff {float((reference - out).detach().abs().max()):.2e}, gradient max diff {float((table.grad - mine).abs().max()):.2e}")
    assert torch.allclose(reference, out, atol=1e-6)
    assert torch.allclose(table.grad, mine, atol=1e-5)


def test_bilinear_interpolation_is_exact_on_a_linear_function():
    field = HashGridField(1, levels=1, features=1, base=4, finest=4)
    with torch.no_grad():  # vertex values = x + 2y on the 5 x 5 vertex grid
        ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
        field.table.copy_(((xs + 2 * ys) / 4).reshape(-1, 1))
    coords = torch.rand(50, 2)
    out = field.encode(coords)[:, 0]
    assert torch.allclose(out, coords[:, 0] + 2 * coords[:, 1], atol=1e-5)
