"""Train a small character-level GPT on text that ships with Python, with fastattn and with torch's
SDPA from the same initial weights, and print both loss curves and the time per step.

The corpus is the source of a few standard-library modules (always on disk, no download).
Both models see the same batches; with dropout off their losses agree to float rounding,
which is the point: fastattn is a drop-in for the attention inside the model.

    python examples/small_gpt.py                  # 200 steps of two models: 9 min (522 s) measured on a
                                                  # 2-core CPU, ~16 min (4.8 s a step) on a busier one
    python examples/small_gpt.py --steps 20       # a first look in a tenth of that
    python examples/small_gpt.py --steps 5        # smoke test
    python examples/small_gpt.py --attention fastattn --device cuda --steps 2000 --d-model 384 --layers 6
"""

from __future__ import annotations

import argparse
import copy
import inspect
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastattn


def load_corpus() -> str:
    import argparse as m1
    import dataclasses as m2
    import textwrap as m3

    return "\n".join(inspect.getsource(m) for m in (m1, m2, m3))


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention block; ``impl`` picks fastattn or torch for the attention itself."""

    def __init__(self, d_model: int, num_heads: int, impl: str) -> None:
        super().__init__()
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, E // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, nh, L, hs)
        if self.impl == "fastattn":
            y = fastattn.attention(q, k, v, causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, E))


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, impl: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, impl)
        self.mlp = fastattn.nn.FeedForward(d_model, 4 * d_model, activation="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, num_heads: int, num_layers: int, block_size: int, impl: str):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.positions = fastattn.nn.LearnedPositionalEncoding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, impl) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def set_attention(self, impl: str) -> None:
        for block in self.blocks:
            block.attn.impl = impl

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.positions(self.token_embedding(idx))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def sample(self, idx: torch.Tensor, new_tokens: int, block_size: int) -> torch.Tensor:
        for _ in range(new_tokens):
            logits = self(idx[:, -block_size:])[:, -1]
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
        return idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--attention", choices=["both", "fastattn", "torch"], default="both")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample-tokens", type=int, default=120, help="characters sampled after training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    text = load_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    print(f"corpus: {len(text):,} characters of stdlib source, vocabulary {len(chars)}")

    torch.manual_seed(args.seed)
    base = GPT(len(chars), args.d_model, args.heads, args.layers, args.block_size, "fastattn").to(args.device)
    impls = ["fastattn", "torch"] if args.attention == "both" else [args.attention]
    models, optimizers = {}, {}
    for impl in impls:  # same initial weights for every implementation
        models[impl] = copy.deepcopy(base)
        models[impl].set_attention(impl)
        optimizers[impl] = torch.optim.AdamW(models[impl].parameters(), lr=args.lr)
    print(f"model: {sum(p.numel() for p in base.parameters()):,} parameters, device {args.device}")

    generator = torch.Generator().manual_seed(args.seed)
    seconds = {impl: 0.0 for impl in impls}
    largest_gap = 0.0
    print("step  " + "  ".join(f"{impl:>10}" for impl in impls))
    for step in range(1, args.steps + 1):
        starts = torch.randint(len(data) - args.block_size - 1, (args.batch_size,), generator=generator)
        x = torch.stack([data[s : s + args.block_size] for s in starts]).to(args.device)
        y = torch.stack([data[s + 1 : s + args.block_size + 1] for s in starts]).to(args.device)
        losses = {}
        for impl in impls:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = models[impl](x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizers[impl].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[impl].step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step > 1:  # the first step includes warm-up
                seconds[impl] += time.perf_counter() - start
            losses[impl] = loss.item()
        if len(impls) == 2:
            largest_gap = max(largest_gap, abs(losses["fastattn"] - losses["torch"]))
        if step == 1 or step % max(1, args.steps // 15) == 0 or step == args.steps:
            print(f"{step:4d}  " + "  ".join(f"{losses[impl]:10.4f}" for impl in impls))
    if args.steps > 1:
        print("time per step: " + ", ".join(f"{impl} {1000 * seconds[impl] / (args.steps - 1):.1f} ms" for impl in impls))
    if len(impls) == 2:
        print(f"largest |loss difference| fastattn vs torch over {args.steps} steps: {largest_gap:.2e}")

    model = models[impls[0]].eval()
    prompt = torch.tensor([[stoi[c] for c in "def "]], device=args.device)
    sample = model.sample(prompt, args.sample_tokens, args.block_size)[0].tolist()
    print("sample:\n" + "".join(chars[i] for i in sample))


if __name__ == "__main__":
    main()
