"""Attention maps: capture the attention probabilities of chosen layers and heads, plot them, summarise them.

Fused kernels never materialise the ``(Lq, Lk)`` probabilities, so they are recomputed on demand:
:class:`capture_attention` records the (normalised) arguments of every fastattn call made inside it
-- through :func:`fastattn.attention`, :func:`fastattn.scaled_dot_product_attention` or any module
built on them -- and :meth:`AttentionRecord.probabilities` recomputes the softmax exactly with
:func:`fastattn.reference.probabilities` (same masks, ALiBi, softcap; before dropout)::

    with fastattn.analysis.capture_attention(model, layers=[0, 3]) as capture:
        model(tokens)
    p = capture.records[0].probabilities()            # (B, Hq, Lq, Lk), rows sum to 1
    stats = fastattn.analysis.head_statistics(capture.records[0])
    fastattn.analysis.plot_attention_maps(capture.records, "maps.png", heads=[0, 1])

The model's own computation is untouched: the call still runs on the backend it chose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import reference
from ._inputs import AttentionInputs


@dataclass
class AttentionRecord:
    """One recorded attention call.

    Attributes:
        layer: position of the call among the calls made inside the capture (0, 1, ...).
        module: qualified name of the innermost module of the captured model that was running
            (``"blocks.1.attn"``), or None without a model.
        inputs: the call's normalised arguments, detached.
    """

    layer: int
    module: str | None
    inputs: AttentionInputs

    def probabilities(self) -> torch.Tensor:
        """Attention probabilities ``(B, Hq, Lq, Lk)`` in float32 (float64 for float64 inputs),
        exactly the reference softmax; a row that sees no key is all zeros. Dropout is not applied."""
        with torch.no_grad():
            return reference.probabilities(self.inputs)[0]


class capture_attention(contextlib.AbstractContextManager):
    """Record the fastattn calls made inside the ``with`` block.

    Args:
        model: optional ``nn.Module``; when given, each record names the innermost submodule that
            made the call (through forward pre-hooks, removed on exit).
        layers: which calls to keep: ints are call positions (0 = first attention call), strings
            are module names (needs ``model``). Default: every call.

    Every fastattn entry point ends in ``fastattn.autograd.run(inputs, backend, return_lse)``
    with the normalised :class:`~fastattn._inputs.AttentionInputs`; the capture wraps that function
    (in every fastattn module that holds it) for the duration of the block.
    """

    def __init__(self, model: nn.Module | None = None, layers: list[int | str] | None = None):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(x, (int, str)) and not isinstance(x, bool) for x in layers
            ):
                raise TypeError(f"layers must be a list of ints (call positions) or strs (module names), got {layers!r}")
            if any(isinstance(x, str) for x in layers) and model is None:
                raise ValueError("layers given as module names need model=")
        self.model = model
        self.layers = None if layers is None else list(layers)
        self.records: list[AttentionRecord] = []
        self._calls = 0
        self._stack: list[str] = []
        self._hooks: list = []
        self._patched: list = []

    def _wanted(self, position: int, module: str | None) -> bool:
        return self.layers is None or position in self.layers or (module is not None and module in self.layers)

    def __enter__(self) -> capture_attention:
        from . import autograd

        original = autograd.run

        def recording_run(inputs: AttentionInputs, backend_name: str, return_lse: bool):
            module = self._stack[-1] if self._stack else None
            position = self._calls
            self._calls += 1
            if self._wanted(position, module):
                detached = dataclasses.replace(
                    inputs, q=inputs.q.detach(), k=inputs.k.detach(), v=inputs.v.detach(),
                    attn_mask=None if inputs.attn_mask is None else inputs.attn_mask.detach(),
                    attn_mask_own=None if inputs.attn_mask_own is None else inputs.attn_mask_own.detach(),
                )
                self.records.append(AttentionRecord(position, module, detached))
            return original(inputs, backend_name, return_lse)

        for name, module in list(sys.modules.items()):
            if (name == "fastattn" or name.startswith("fastattn.")) and getattr(module, "run", None) is original:
                self._patched.append((module, original))
                module.run = recording_run
        if self.model is not None:
            for name, sub in self.model.named_modules():
                self._hooks.append(sub.register_forward_pre_hook(self._push(name or "<model>")))
                self._hooks.append(sub.register_forward_hook(self._pop, always_call=True))
        return self

    def _push(self, name: str):
        def hook(module, args):
            self._stack.append(name)
        return hook

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def __exit__(self, *exc) -> None:
        for module, original in reversed(self._patched):
            module.run = original
        self._patched.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._stack.clear()
        return None


def head_statistics(record: AttentionRecord | torch.Tensor, offset: int | None = None) -> list[dict]:
    """Per-head statistics of one attention map, averaged over batch and query rows.

    Args:
        record: an :class:`AttentionRecord`, or probabilities ``(B, H, Lq, Lk)``.
        offset: ``Lk - Lq`` alignment of query ``i`` with key ``i + offset`` (default ``Lk - Lq``,
            fastattn's bottom-right rule).

    Returns:
        One dict per head: ``head``, ``entropy`` (nats, ``-sum p log p``; 0 = one key,
        ``log(n)`` = uniform over n keys), ``normalized_entropy`` (entropy / log of the number of
        visible keys), and ``mean_distance`` (``sum_j p_ij |i + offset - j|``, in tokens). Rows that
        see no key are left out.
    """
    p = record.probabilities() if isinstance(record, AttentionRecord) else record
    if p.dim() != 4:
        raise ValueError(f"probabilities must be (B, H, Lq, Lk), got shape {tuple(p.shape)}")
    p = p.to(torch.float64)
    _, H, Lq, Lk = p.shape
    offset = Lk - Lq if offset is None else offset
    rows = p.sum(-1) > 0  # (B, H, Lq)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    visible = (p > 0).sum(-1).clamp_min(1).to(torch.float64)
    normalized = torch.where(visible > 1, entropy / torch.log(visible.clamp_min(2)), torch.zeros_like(entropy))
    i = torch.arange(Lq, dtype=torch.float64).view(-1, 1)
    j = torch.arange(Lk, dtype=torch.float64).view(1, -1)
    distance = (p * (i + offset - j).abs()).sum(-1)
    out = []
    for h in range(H):
        keep = rows[:, h]
        n = int(keep.sum())
        out.append({
            "head": h,
            "entropy": float(entropy[:, h][keep].mean()) if n else float("nan"),
            "normalized_entropy": float(normalized[:, h][keep].mean()) if n else float("nan"),
            "mean_distance": float(distance[:, h][keep].mean()) if n else float("nan"),
        })
    return out


def plot_attention_maps(records: list[AttentionRecord], path: str | Path, heads: list[int] | None = None,
                        batch_index: int = 0) -> Path:
    """Heatmaps: one row per record (layer), one column per head, of batch element ``batch_index``.

    Every panel shares one colour scale (the colour bar: attention probability, 0 to the largest
    shown) and has query/key position ticks; its title gives the head's entropy and mean attention
    distance (:func:`head_statistics`), which the figure's footnote explains.

    Raises:
        ImportError: matplotlib is not installed (it is optional: ``pip install matplotlib``).
    """
    from .bench.plots import _pyplot

    plt = _pyplot()
    fig = attention_figure(records, heads, batch_index)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_figure(records: list[AttentionRecord], heads: list[int] | None = None, batch_index: int = 0):
    """The matplotlib figure :func:`plot_attention_maps` saves."""
    from .bench.plots import _pyplot

    if not records:
        raise ValueError("records is empty: nothing was captured")
    maps = [(r, r.probabilities()) for r in records]
    n_heads = maps[0][1].shape[1]
    heads = list(range(n_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads must lie in [0, {n_heads}), got {bad}")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    vmax = max(float(p[batch_index, heads].max()) for _, p in maps) or 1.0
    fig, axes = plt.subplots(len(maps), len(heads), figsize=(2.6 * len(heads) + 1.0, 2.7 * len(maps) + 0.6),
                             squeeze=False, layout="constrained")
    image = None
    for row, (record, p) in enumerate(maps):
        stats = head_statistics(p)
        for col, h in enumerate(heads):
            ax = axes[row][col]
            image = ax.imshow(p[batch_index, h].float().cpu().numpy(), cmap="viridis", aspect="auto",
                              interpolation="nearest", vmin=0.0, vmax=vmax)
            name = record.module or f"call {record.layer}"
            ax.set_title(f"{name}, head {h}\nentropy {stats[h]['entropy']:.2f}, dist {stats[h]['mean_distance']:.1f}",
                         fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_ylabel("query position", fontsize=7)
            if row == len(maps) - 1:
                ax.set_xlabel("key position", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.supxlabel("entropy: -sum p log p over a query's keys, in nats (0 = one key, log n = uniform over n keys)\n"
                  "dist: |query - key| in tokens, weighted by p; both averaged over the queries", fontsize=6)
    return fig


# ----------------------------------------------------------------------------------- example model
class ExampleBlock(nn.Module):
    """Pre-norm transformer block whose attention is :func:`fastattn.scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # Larger than default query/key weights, so an untrained model's heads are not all uniform.
        nn.init.normal_(self.qkv.weight, std=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import scaled_dot_product_attention

        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.norm2(x))


class ExampleModel(nn.Module):
    """A tiny randomly initialised transformer for the ``fastattn attention-map`` demo."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 4096,
                 causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(ExampleBlock(dim, heads, causal) for _ in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return x


def cli_main(args) -> int:
    """``fastattn attention-map``: capture, plot and summarise the example model's attention."""
    for name in ("seq_len", "num_layers", "num_heads"):
        if getattr(args, name) < 1:
            print(f"fastattn attention-map: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    torch.manual_seed(args.seed)
    model = ExampleModel(heads=args.num_heads, dim=16 * args.num_heads, layers=args.num_layers,
                         max_len=max(args.seq_len, 1), causal=args.causal).eval()
    # Repeated token patterns give the random heads something to lock on to.
    pattern = torch.randint(0, 256, (max(1, args.seq_len // 4),))
    tokens = pattern.repeat(math.ceil(args.seq_len / pattern.numel()))[: args.seq_len].unsqueeze(0)
    bad = [x for x in (args.layers or []) if not 0 <= x < args.num_layers]
    if bad:
        print(f"fastattn attention-map: error: --layers must lie in [0, {args.num_layers}), got {bad}", file=sys.stderr)
        return 2
    with torch.no_grad(), capture_attention(model, layers=args.layers) as capture:
        model(tokens)
    from .bench.plots import plotting_unavailable

    out = Path(args.out)
    n_heads = capture.records[0].inputs.q.shape[1] if capture.records else args.num_heads
    bad = [h for h in (args.heads or []) if not 0 <= h < n_heads]
    if bad:
        print(f"fastattn attention-map: error: --heads must lie in [0, {n_heads}), got {bad}", file=sys.stderr)
        return 2
    png = None if plotting_unavailable() else plot_attention_maps(capture.records, out / "attention_maps.png",
                                                                   heads=args.heads)
    stats = [{"layer": r.layer, "module": r.module, **s} for r in capture.records for s in head_statistics(r)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"{'layer':>5}  {'module':<12} {'head':>4}  {'entropy':>8}  {'norm.':>6}  {'mean dist':>9}")
    for s in stats:
        print(f"{s['layer']:>5}  {s['module'] or '':<12} {s['head']:>4}  {s['entropy']:>8.3f}  "
              f"{s['normalized_entropy']:>6.3f}  {s['mean_distance']:>9.2f}")
    print(f"wrote {png}" if png else f"no plot: {plotting_unavailable()}")
    print(f"wrote {out / 'attention_stats.json'}")
    return 0
