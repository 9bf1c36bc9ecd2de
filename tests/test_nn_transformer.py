"""fastattn.nn Transformer blocks against torch.nn.Transformer* (float64, eval mode, dropout 0):
state_dict both ways, outputs and input gradients; FeedForward; Seq2SeqTransformer."""

import pytest
import torch

import fastattn.nn as fnn

DT = torch.float64
E, NHEAD, FF = 24, 4, 40


def load_pair(theirs, ours):
    theirs, ours = theirs.to(DT).eval(), ours.to(DT).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def compare(theirs, ours, inputs, **kwargs):
    """Outputs and gradients w.r.t. every input tensor."""
    results = []
    for module in (theirs, ours):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = module(*leaves, **kwargs)
        results.append((out, leaves))
    (out_t, leaves_t), (out_o, leaves_o) = results
    torch.testing.assert_close(out_o, out_t)
    dout = torch.randn_like(out_t)
    for g_o, g_t in zip(torch.autograd.grad(out_o, leaves_o, dout), torch.autograd.grad(out_t, leaves_t, dout)):
        torch.testing.assert_close(g_o, g_t)


def seq(n, length, batch_first):
    return torch.randn(n, length, E, dtype=DT) if batch_first else torch.randn(length, n, E, dtype=DT)


LAYOUTS = [
    pytest.param(False, False, "relu", id="postnorm-seqfirst-relu"),
    pytest.param(True, True, "gelu", id="prenorm-batchfirst-gelu"),
    pytest.param(False, True, "gelu", id="postnorm-batchfirst-gelu"),
]


@pytest.mark.parametrize("norm_first, batch_first, activation", LAYOUTS)
def test_encoder_layer_matches_torch(norm_first, batch_first, activation):
    kwargs = dict(dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first)
    theirs, ours = load_pair(torch.nn.TransformerEncoderLayer(E, NHEAD, **kwargs), fnn.TransformerEncoderLayer(E, NHEAD, **kwargs))
    src = seq(3, 9, batch_first)
    kpm = torch.arange(9)[None] >= torch.tensor([9, 5, 7])[:, None]
    compare(theirs, ours, [src])
    compare(theirs, ours, [src], src_key_padding_mask=kpm)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=DT)
    compare(theirs, ours, [src], src_mask=mask, is_causal=True)


@pytest.mark.parametrize("norm_first, batch_first, activation", LAYOUTS)
def test_decoder_layer_matches_torch(norm_first, batch_first, activation):
    kwargs = dict(dim_feedforward=FF, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first)
    theirs, ours = load_pair(torch.nn.TransformerDecoderLayer(E, NHEAD, **kwargs), fnn.TransformerDecoderLayer(E, NHEAD, **kwargs))
    tgt, memory = seq(2, 6, batch_first), seq(2, 11, batch_first)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=DT)
    memory_kpm = torch.arange(11)[None] >= torch.tensor([11, 4])[:, None]
    compare(theirs, ours, [tgt, memory], tgt_mask=tgt_mask, memory_key_padding_mask=memory_kpm)
    compare(theirs, ours, [tgt, memory], tgt_mask=tgt_mask, tgt_is_causal=True)


@pytest.mark.parametrize("norm_first, batch_first", [(False, False), (True, True)], ids=["postnorm-seqfirst", "prenorm-batchfirst"])
def test_transformer_matches_torch(norm_first, batch_first):
    kwargs = dict(dim_feedforward=FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    theirs, ours = load_pair(torch.nn.Transformer(E, NHEAD, 2, 3, **kwargs), fnn.Transformer(E, NHEAD, 2, 3, **kwargs))
    src, tgt = seq(2, 7, batch_first), seq(2, 5, batch_first)
    src_kpm = torch.arange(7)[None] >= torch.tensor([7, 3])[:, None]
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    compare(theirs, ours, [src, tgt], tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm)
    # encode / decode are forward in two steps (decode is causal without a mask)
    memory = ours.encode(src, src_key_padding_mask=src_kpm)
    torch.testing.assert_close(ours.decode(tgt, memory, memory_key_padding_mask=src_kpm),
                               theirs(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_kpm,
                                      memory_key_padding_mask=src_kpm))


def test_state_dict_into_torch():
    ours = fnn.Transformer(E, NHEAD, 1, 1, FF, dropout=0.0)
    theirs = torch.nn.Transformer(E, NHEAD, 1, 1, FF, dropout=0.0)
    theirs.load_state_dict(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_feed_forward(activation):
    ff = fnn.FeedForward(10, 14, activation=activation).to(DT)
    x = torch.randn(2, 3, 10, dtype=DT)
    h = ff.linear1(x)
    if activation == "swiglu":
        assert ff.linear1.out_features == 28
        h = torch.nn.functional.silu(h[..., :14]) * h[..., 14:]
    else:
        h = torch.relu(h) if activation == "relu" else torch.nn.functional.gelu(h)
    torch.testing.assert_close(ff(x), ff.linear2(h))
    layer = fnn.TransformerEncoderLayer(10, 2, 14, dropout=0.0, activation="swiglu", batch_first=True)
    assert layer(x.float()).shape == x.shape
    with pytest.raises(ValueError, match="activation"):
        fnn.FeedForward(10, 14, activation="tanhh")


def test_seq2seq_transformer_forward_and_generate():
    model = fnn.Seq2SeqTransformer(13, d_model=16, num_heads=2, num_layers=1, dropout=0.0, pad_id=0).eval()
    src = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
    tokens = model.generate(src, max_new_tokens=5, bos_id=1)
    assert tokens.shape == (2, 6) and (tokens[:, 0] == 1).all()
    # Greedy: each generated token is the argmax of teacher-forced logits on the prefix.
    logits = model(src, tokens[:, :-1])
    torch.testing.assert_close(logits.argmax(-1), tokens[:, 1:])
    # Causal: logits of a prefix do not depend on later target tokens.
    torch.testing.assert_close(model(src, tokens[:, :3]), logits[:, :3])
    # Padding in the source is ignored: extra pad tokens change nothing.
    padded = torch.cat([src, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded[:1], tokens[:1, :-1]), logits[:1], atol=1e-5, rtol=1e-4)
