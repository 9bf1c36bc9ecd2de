"""Sinusoidal, learned, ALiBi and relative-position encodings."""

import math

import pytest
import torch

import fastattn
from fastattn.nn import LearnedPositionalEncoding, RelativePositionBias, SinusoidalPositionalEncoding, alibi_slopes
from fastattn.nn.positional import relative_position_bucket


def test_sinusoidal_values_and_growth():
    pe = SinusoidalPositionalEncoding(6, max_len=4)
    table = pe.get_positional_encoding(3)
    assert table.shape == (3, 6)
    for pos in range(3):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    # Past max_len the table is computed on the fly and continues the same function.
    long = pe.get_positional_encoding(9)
    torch.testing.assert_close(long[:4], pe.get_positional_encoding(4))
    torch.testing.assert_close(pe.get_positional_encoding(2, offset=7), long[7:9])
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(pe(x), x + long[:5])
    assert pe.state_dict() == {}


def test_sinusoidal_odd_width():
    table = SinusoidalPositionalEncoding(7).get_positional_encoding(5)
    assert table.shape == (5, 7) and torch.isfinite(table).all()


def test_learned_positions():
    pe = LearnedPositionalEncoding(10, 4)
    x = torch.zeros(1, 3, 4)
    torch.testing.assert_close(pe(x, offset=2), pe.embedding.weight[2:5][None])
    with pytest.raises(ValueError, match="positions"):
        pe(torch.zeros(1, 11, 4))


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # Not a power of two: the 4-head slopes, then every other slope of the 8-head set.
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))
    assert alibi_slopes(1).tolist() == [2.0**-8]
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def test_bucket_matches_huggingface_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-300, 300)[None, :] - torch.arange(0, 5)[:, None]
    for bidirectional in (True, False):
        want = t5.T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        got = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(got, want)


def test_relative_position_bias_is_learned_through_attention():
    bias_module = RelativePositionBias(num_heads=3, num_buckets=8, max_distance=16).double()
    q, k, v = (torch.randn(2, 3, 6, 8, dtype=torch.float64) for _ in range(3))
    bias = bias_module(6, 6)
    assert bias.shape == (1, 3, 6, 6)
    fastattn.attention(q, k, v, attn_mask=bias).pow(2).sum().backward()
    got = bias_module.relative_attention_bias.weight.grad.clone()
    bias_module.zero_grad()
    fastattn.reference.attention(q, k, v, attn_mask=bias_module(6, 6)).pow(2).sum().backward()
    torch.testing.assert_close(got, bias_module.relative_attention_bias.weight.grad)
    assert got.abs().sum() > 0
    # Cached decoding: the last query of a longer sequence sees the same biases as the full bias's last row.
    torch.testing.assert_close(bias_module(1, 6), bias_module(6, 6)[:, :, -1:])
