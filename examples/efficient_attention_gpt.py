"""Train the same small character-level GPT with each attention kind of fastattn -- exact softmax,
linear (elu+1), Performer (FAVOR+) and Reformer's LSH -- and report quality against speed.

Every model is a stack of ``fastattn.nn.TransformerEncoderLayer`` (pre-norm, causal) whose
self-attention is picked with ``attention=``; all start from the same seed and see the same
batches of the same corpus (the source of a few standard-library modules: no download). At the
end the linear model generates text token by token from its recurrent state
(``fastattn.nn.LinearAttentionCache``: O(1) memory per layer, however long the text).

    python examples/efficient_attention_gpt.py                       # 150 steps per kind, a few minutes on CPU
    python examples/efficient_attention_gpt.py --steps 3 --d-model 32 --block-size 32   # smoke test
    python examples/efficient_attention_gpt.py --kinds softmax,linear --block-size 1024 --device cuda
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.nn import LinearAttentionCache, TransformerEncoderLayer

KINDS = ("softmax", "linear", "performer", "lsh")


def load_corpus() -> str:
    import argparse as m1
    import dataclasses as m2
    import textwrap as m3

    return "\n".join(inspect.getsource(m) for m in (m1, m2, m3))


class GPT(nn.Module):
    """Token embedding, learned positions, causal pre-norm layers, output head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, block_size: int, attention: str) -> None:
        super().__init__()
        options = {
            "softmax": None,
            "linear": {"chunk_size": 32},
            "performer": {"num_features": 2 * (d_model // heads)},
            "lsh": {"n_buckets": 4, "chunk_size": 16},
        }[attention]
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.layers = nn.ModuleList([
            TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True,
                                    norm_first=True, attention=attention, attention_kwargs=options)
            for _ in range(layers)
        ])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, L)`` to logits ``(B, L, vocab)``."""
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x, is_causal=True)
        return self.head(self.norm(x))


@torch.no_grad()
def generate_recurrent(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of a linear-attention GPT from its recurrent states: each step feeds one token
    through every layer with that layer's :class:`LinearAttentionCache` (no growing KV cache)."""
    caches = [LinearAttentionCache() for _ in model.layers]
    tokens, step_input = prompt, prompt
    for _ in range(new_tokens):
        start = tokens.shape[1] - step_input.shape[1]
        x = model.embed(step_input) + model.pos(torch.arange(start, tokens.shape[1], device=prompt.device))
        for layer, cache in zip(model.layers, caches):
            attn = layer.self_attn.attn  # the LinearAttention module inside the layer
            x = x + attn(layer.norm1(x), cache=cache, causal=True)
            x = x + layer._ff_block(layer.norm2(x))
        next_token = model.head(model.norm(x[:, -1])).argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        step_input = next_token
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated attention kinds ({', '.join(KINDS)})")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample-tokens", type=int, default=40)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")

    text = load_corpus()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randint(0, len(train) - args.block_size - 1, (args.batch_size,), generator=generator)
              for _ in range(args.steps)]
    val_starts = torch.arange(0, len(val) - args.block_size - 1, args.block_size)[:32]

    def batch(source, index):
        x = torch.stack([source[i : i + args.block_size] for i in index])
        y = torch.stack([source[i + 1 : i + 1 + args.block_size] for i in index])
        return x.to(args.device), y.to(args.device)

    results, models = [], {}
    for kind in kinds:
        torch.manual_seed(0)
        model = GPT(len(chars), args.d_model, args.heads, args.layers, args.block_size, kind).to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        start = time.perf_counter()
        for step, index in enumerate(starts):
            x, y = batch(train, index)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                print(f"{kind:9s} step {step:4d}  train loss {loss.item():.3f}")
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            x, y = batch(val, val_starts)
            val_loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        results.append((kind, val_loss, 1e3 * seconds / args.steps))
        models[kind] = model

    print(f"\nquality vs speed ({args.steps} steps, batch {args.batch_size} x {args.block_size} tokens, "
          f"d_model {args.d_model}, {args.layers} layers, {args.device}, fastattn {fastattn.__version__}):")
    print(f"{'attention':10s} {'val loss':>9s} {'ms/step':>9s}")
    for kind, val_loss, ms in results:
        print(f"{kind:10s} {val_loss:9.3f} {ms:9.1f}")

    if "linear" in models:
        model = models["linear"]
        prompt = data[split : split + 8].unsqueeze(0).to(args.device)
        tokens = generate_recurrent(model, prompt, min(args.sample_tokens, args.block_size - prompt.shape[1]))
        print("\nlinear attention, recurrent decoding:", repr("".join(chars[t] for t in tokens[0].tolist())))
        with torch.no_grad():  # the same tokens from the full forward pass: greedy picks agree
            full = model(tokens[:, :-1])[0, prompt.shape[1] - 1 :].argmax(-1)
        print("recurrent decoding matches the full forward pass:", torch.equal(full, tokens[0, prompt.shape[1] :]))


if __name__ == "__main__":
    main()
