"""Generate text with a paged KV cache: a small decoder of ``fastattn.nn.Attention`` layers (GQA,
rotary) decodes several prompts of different lengths in one batch, each layer keeping its keys and
values in a ``fastattn.nn.PagedKVCache`` -- a pool of 16-token pages handed out as sequences grow.

The weights are random (no training, no download), so the text is noise; what the example shows is
the mechanics: ragged prefill (one call per prompt on its own cache row), batched one-token decode
steps through ``fastattn.attention_with_kvcache`` (the CPU decode kernel reads the pages in place),
pages freed when a sequence is done, and a check that every generated token and logit equals what
the model gives when it reruns the whole text without any cache.

    python examples/paged_generation.py                   # 48 new tokens per prompt
    python examples/paged_generation.py --steps 8         # smoke test
    python examples/paged_generation.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import string
import sys
import time

import torch
from torch import nn

from fastattn.nn import Attention, PagedKVCache

CHARS = string.ascii_lowercase + " .,"
PROMPTS = ["the paged cache ", "fastattn ", "once upon a time there was a kernel "]


class Decoder(nn.Module):
    """Character embedding, pre-norm causal attention + MLP blocks, output head."""

    def __init__(self, dim: int, heads: int, kv_heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(CHARS), dim)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.attns = nn.ModuleList(Attention(dim, heads, kv_heads, causal=True, position="rotary") for _ in range(layers))
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
                                  for _ in range(layers))
        self.head = nn.Linear(dim, len(CHARS))

    def forward(self, tokens: torch.Tensor, caches=None) -> torch.Tensor:
        """``tokens (B, L)`` -> logits ``(B, L, vocab)``; ``caches``: one cache per layer, or None."""
        h = self.embed(tokens)
        for i in range(len(self.attns)):
            h = h + self.attns[i](self.attn_norms[i](h), cache=None if caches is None else caches[i])
            h = h + self.mlps[i](self.mlp_norms[i](h))
        return self.head(h)


def encode(text: str, device) -> torch.Tensor:
    return torch.tensor([[CHARS.index(c) for c in text]], device=device)


def decode(tokens: torch.Tensor) -> str:
    return "".join(CHARS[t] for t in tokens.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = Decoder(args.dim, args.heads, args.kv_heads, args.layers).to(args.device, dtype).eval()

    batch = len(PROMPTS)
    longest = max(len(p) for p in PROMPTS) + args.steps
    pages_per_seq = -(-longest // args.page_size)
    caches = [PagedKVCache(batch, batch * pages_per_seq, args.page_size, args.kv_heads, args.dim // args.heads,
                           max_pages_per_seq=pages_per_seq, dtype=dtype, device=args.device)
              for _ in range(args.layers)]

    start = time.perf_counter()
    with torch.inference_mode():
        # Ragged prefill: each prompt on its own row of every layer's cache.
        last = torch.cat([model(encode(p, args.device), [c.select([b]) for c in caches])[:, -1]
                          for b, p in enumerate(PROMPTS)])  # (batch, vocab)
        new_tokens, logits = [], [last]
        for step in range(args.steps):  # batched decode: one token per sequence per step
            nxt = last.argmax(-1, keepdim=True)  # (batch, 1), greedy
            new_tokens.append(nxt)
            if step + 1 < args.steps:
                last = model(nxt, caches)[:, -1]
                logits.append(last)
        elapsed = time.perf_counter() - start
        new_tokens, logits = torch.cat(new_tokens, 1), torch.stack(logits, 1)  # (batch, steps), (batch, steps, V)
        cache = caches[0]
        print(f"{args.layers} layers, {args.heads} query / {args.kv_heads} key-value heads, pages of "
              f"{args.page_size} tokens, {args.dtype} on {args.device}")
        print(f"generated {args.steps} tokens for {batch} prompts in {elapsed:.2f} s; sequence lengths "
              f"{cache.lengths}, pages in use per layer {cache.num_pages - len(cache.free_pages)} of {cache.num_pages}")
        print("block_table of layer 0:", cache.block_table.tolist())
        for b, prompt in enumerate(PROMPTS):
            print(f"  {prompt!r} -> {decode(new_tokens[b])!r}")

        # The check: rerun every full text without a cache, one step at a time, greedy as above.
        worst, same = 0.0, True
        for b, prompt in enumerate(PROMPTS):
            tokens = encode(prompt, args.device)
            for step in range(args.steps):
                full = model(tokens)[:, -1]
                worst = max(worst, (full.float() - logits[b, step].float()).abs().max().item())
                tokens = torch.cat([tokens, full.argmax(-1, keepdim=True)], 1)
            same &= torch.equal(tokens[0, len(prompt):], new_tokens[b])
        for c in caches:
            c.reset()  # every sequence done: all pages back in the pool
        print(f"largest |logit difference| against the full forward: {worst:.2e}; "
              f"pages free after reset: {len(caches[0].free_pages)}")
    print("paged generation matches the full forward pass:", same)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
