"""LocalCrossAttention and NeighborMaskedAttention against torch's MultiheadAttention with a mask."""

import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE
from fastuad.nn import LocalCrossAttention, NeighborMaskedAttention, WindowAttention
from fastuad.ops import window_mask

DIM, HEADS, GRID = 16, 2, (4, 5)


def _mha_like(layer) -> nn.MultiheadAttention:
    """torch's MultiheadAttention holding the layer's weights (the independent reference)."""
    mha = nn.MultiheadAttention(layer.dim, layer.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        mha.out_proj.weight.copy_(layer.out_proj.weight)
        mha.out_proj.bias.copy_(layer.out_proj.bias)
    return mha


def _tokens(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, -1, -1, -1).reshape(batch, -1, t.shape[-1])


def _x(batch=2, seed=0):
    return torch.randn(batch, *GRID, DIM, generator=torch.Generator().manual_seed(seed))


def test_local_cross_attention_matches_masked_mha():
    torch.manual_seed(0)
    layer = LocalCrossAttention(DIM, HEADS, (3, 5), grid_size=GRID, backend="torch")
    x = _x()
    out = layer(x)
    ref = layer.reference
    blocked = ~window_mask(GRID, (3, 5), "inside")  # MultiheadAttention masks where True
    want, _ = _mha_like(layer)(_tokens(x, 2), _tokens(ref, 2), _tokens(ref, 2), attn_mask=blocked)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(want.shape), want, atol=1e-5, rtol=1e-5)


def test_neighbor_masked_attention_matches_masked_mha():
    torch.manual_seed(1)
    layer = NeighborMaskedAttention(DIM, HEADS, 3, backend="torch")
    x, mem = _x(seed=1), _x(seed=2)
    blocked = window_mask(GRID, 3, "inside")  # outside mode: the window itself is masked
    mha = _mha_like(layer)
    for args, (k, v) in [((x,), (x, x)), ((x, mem), (mem, mem)), ((x, mem[:1], x), (mem[:1], x))]:
        want, _ = mha(_tokens(x, 2), _tokens(k, 2), _tokens(v, 2), attn_mask=blocked)
        torch.testing.assert_close(layer(*args).reshape(want.shape), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [LocalCrossAttention, NeighborMaskedAttention])
def test_triton_backend_matches_torch_with_gradients(cls):
    torch.manual_seed(2)
    kwargs = {"grid_size": GRID} if cls is LocalCrossAttention else {}
    layers = {b: cls(DIM, HEADS, 3, backend=b, **kwargs).to(TRITON_DEVICE) for b in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = _x(seed=3).to(TRITON_DEVICE)
    key = _x(batch=1, seed=4).to(TRITON_DEVICE)  # RLR's masked learnable-key attention: a batch-1 key
    outs, grads = {}, {}
    for name, layer in layers.items():
        xi, ki = x.clone().requires_grad_(), key.clone().requires_grad_()
        args = (xi,) if cls is LocalCrossAttention else (xi, ki, xi)
        outs[name] = layer(*args)
        outs[name].square().sum().backward()
        grads[name] = [xi.grad, ki.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=2e-5, rtol=1e-5)
    for got, want in zip(grads["triton"], grads["torch"]):
        if want is None:  # LocalCrossAttention does not read the extra key
            assert got is None
            continue
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reference_parameter_is_learned_and_broadcast():
    layer = LocalCrossAttention(DIM, HEADS, 3, grid_size=GRID)
    assert layer.reference.shape == (1, *GRID, DIM)
    layer(_x(batch=3)).sum().backward()
    assert layer.reference.grad is not None and layer.reference.grad.abs().sum() > 0


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_heads"):
        NeighborMaskedAttention(DIM, 3, 3)
    with pytest.raises(ValueError, match="window must be positive and odd"):
        LocalCrossAttention(DIM, HEADS, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        WindowAttention(DIM, HEADS, 3, mode="around")
    with pytest.raises(ValueError, match="reference must be given"):
        LocalCrossAttention(DIM, HEADS, 3)(_x())
    layer = NeighborMaskedAttention(DIM, HEADS, 3)
    with pytest.raises(ValueError, match=r"query must be \[B, H, W, 16\]"):
        layer(torch.randn(2, 20, DIM))
    with pytest.raises(ValueError, match=r"key must have the query grid"):
        layer(_x(), torch.randn(2, 5, 4, DIM))
    with pytest.raises(ValueError, match="window"):
        layer(torch.randn(1, 1, 1, DIM))  # a 3x3 window is larger than 2*1-1 on a 1x1 grid
