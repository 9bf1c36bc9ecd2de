"""A tour of fastattn in one script: the functional API, masks, modules, and swapping fastattn
into existing models. Every section checks its result against plain PyTorch and prints it.

    python examples/example_usage.py              # a few seconds on a CPU
    python examples/example_usage.py --steps 3    # fewer training steps at the end
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastattn


def report(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    print(f"  {name:<52} max |difference| = {err:.1e}")
    assert err < 1e-4, name


def functional_api() -> None:
    print("1. functional API: fastattn.attention(q, k, v, ...) on (B, H, L, D) tensors")
    q = torch.randn(2, 8, 97, 64)  # 8 query heads
    k = torch.randn(2, 2, 97, 64)  # 2 key/value heads: GQA
    v = torch.randn(2, 2, 97, 64)
    k_full, v_full = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)

    report("causal, GQA", fastattn.attention(q, k, v, causal=True),
           F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))
    i = torch.arange(97)
    local = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 16)  # True = attend
    report("sliding window (16 back), GQA", fastattn.attention(q, k, v, window=(16, 0)),
           F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=local))
    slopes = fastattn.nn.alibi_slopes(8)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :]).abs()
    report("ALiBi slopes, fused", fastattn.attention(q, k, v, alibi_slopes=slopes),
           F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias))
    lengths = torch.tensor([97, 40])
    padded = i[None, None, None, :] < lengths[:, None, None, None]
    report("key_lengths (right padding)", fastattn.attention(q, k, v, key_lengths=lengths),
           F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=padded))
    out, lse = fastattn.attention(q, k, v, softcap=30.0, return_lse=True)
    print(f"  softcap=30 with return_lse: out {tuple(out.shape)}, lse {tuple(lse.shape)} {lse.dtype}")
    report("scaled_dot_product_attention drop-in",
           fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
           F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True))


def masks() -> None:
    print("2. block-sparse masks: empty tiles are never computed")
    q, k, v = (torch.randn(1, 4, 256, 32) for _ in range(3))
    block_mask = fastattn.masks.sliding_window(256, 256, left=48, right=0, block_size=32)
    dense = block_mask.to_dense()
    print(f"  sliding window as a BlockMask: {block_mask.layout.ne(0).float().mean().item():.0%} of tiles visited")
    report("BlockMask vs the same dense mask", fastattn.attention(q, k, v, block_mask=block_mask),
           F.scaled_dot_product_attention(q, k, v, attn_mask=dense))
    dense = torch.rand(256, 256) < 0.2
    dense.fill_diagonal_(True)
    report("BlockMask.from_dense(any bool mask)",
           fastattn.attention(q, k, v, block_mask=fastattn.BlockMask.from_dense(dense, block_size=32)),
           F.scaled_dot_product_attention(q, k, v, attn_mask=dense))


def modules() -> None:
    print("3. modules")
    theirs = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours = fastattn.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())  # same parameter names as torch
    x = torch.randn(3, 20, 64)
    kpm = torch.arange(20)[None] >= torch.tensor([20, 15, 9])[:, None]  # True = padding, torch's polarity
    report("MultiheadAttention with torch's weights and masks",
           ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
           theirs(x, x, x, key_padding_mask=kpm, need_weights=False)[0])

    attn = fastattn.nn.Attention(64, num_heads=8, num_kv_heads=2, causal=True, position="rotary").eval()
    full = attn(x)
    cache = fastattn.nn.KVCache()
    steps = [attn(x[:, :12], cache=cache)] + [attn(x[:, t : t + 1], cache=cache) for t in range(12, 20)]
    report("Attention (GQA + rotary): KV-cache decoding vs full", torch.cat(steps, dim=1), full)

    model = fastattn.nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                    dim_feedforward=128, dropout=0.0, batch_first=True).eval()
    reference = nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=128, dropout=0.0, batch_first=True).eval()
    reference.load_state_dict(model.state_dict())
    src, tgt = torch.randn(3, 11, 64), torch.randn(3, 7, 64)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    report("Transformer loads into torch.nn.Transformer", model(src, tgt, tgt_mask=mask),
           reference(src, tgt, tgt_mask=mask))


def patching(steps: int) -> None:
    print("4. swapping fastattn into an existing model")
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False))
    model.eval()
    x = torch.randn(2, 33, 64)
    with torch.no_grad():
        before = model(x)
        replaced = fastattn.patch_model(model)
        after = model(x)
    print(f"  patch_model replaced: {replaced}")
    report("patched torch.nn.TransformerEncoder", after, before)

    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with fastattn.sdpa_override():  # any code calling torch.nn.functional.scaled_dot_product_attention
        routed = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    report("sdpa_override()", routed, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    model.train()
    head = nn.Linear(64, 1)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    target = x.mean(dim=(1, 2))[:, None]
    for step in range(steps):
        loss = F.mse_loss(head(model(x).mean(dim=1)), target)
        optimizer.zero_grad()
        loss.backward()  # gradients flow through fastattn's backward
        optimizer.step()
        print(f"  training the patched model, step {step + 1}: loss {loss.item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps of the patched model at the end")
    args = parser.parse_args()
    torch.manual_seed(0)
    functional_api()
    masks()
    modules()
    patching(args.steps)
    print("every check passed; `fastattn info` shows which backend ran them")


if __name__ == "__main__":
    main()
