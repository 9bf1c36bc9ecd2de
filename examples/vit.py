"""Train a small Vision Transformer (ViT) built from fastattn.nn blocks to classify images of digits.

Data: scikit-learn's 8x8 handwritten digits (1,797 images) when scikit-learn is installed;
otherwise a synthetic set of the same kind, made here: the glyphs 0-9 of matplotlib's bundled
DejaVu fonts, randomly scaled, rotated, shifted and noised, rasterised to 12x12 (the script
says which one it uses). Nothing is downloaded.

    python examples/vit.py                 # 300 steps: up to ~20 min on a 2-core CPU (4.1 s a step
                                           # measured on a busy one); less on a quiet or bigger machine
    python examples/vit.py --steps 5       # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastattn


def sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    return images, torch.tensor(digits.target), "scikit-learn digits (8x8)"


def rendered_digits(count: int = 3000, size: int = 12, seed: int = 0):
    """Digits drawn from font outlines with random affine jitter (matplotlib only, no display)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    rng = np.random.default_rng(seed)
    fonts = [FontProperties(family="DejaVu Sans"), FontProperties(family="DejaVu Serif"),
             FontProperties(family="DejaVu Sans Mono", weight="bold")]
    glyphs = {}
    for digit in range(10):
        for f, font in enumerate(fonts):
            path = TextPath((0, 0), str(digit), size=1.0, prop=font)
            (x0, y0), (x1, y1) = path.get_extents().get_points()
            glyphs[digit, f] = path.transformed(Affine2D().translate(-(x0 + x1) / 2, -(y0 + y1) / 2).scale(1 / max(y1 - y0, 1e-6)))
    supersample = 3
    grid = (np.arange(size * supersample) + 0.5) / (size * supersample) - 0.5
    points = np.stack(np.meshgrid(grid, -grid), axis=-1).reshape(-1, 2)  # image rows go down
    images = np.zeros((count, size, size), dtype=np.float32)
    labels = rng.integers(0, 10, count)
    for n, digit in enumerate(labels):
        path = glyphs[digit, rng.integers(len(fonts))]
        transform = (Affine2D().scale(rng.uniform(0.6, 0.85)).rotate(rng.uniform(-0.3, 0.3))
                     .translate(*rng.uniform(-0.08, 0.08, 2)))
        inside = np.zeros(len(points), dtype=bool)
        for polygon in path.to_polygons(transform):  # even-odd rule: holes (0, 4, 6, 8, 9) stay empty
            inside ^= Path(polygon).contains_points(points)
        images[n] = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    images += rng.normal(0, 0.1, images.shape).astype(np.float32)
    return torch.from_numpy(images.clip(0, 1)), torch.from_numpy(labels), f"rendered font digits ({size}x{size}, synthetic)"


class ViT(nn.Module):
    """Patch embedding, a class token, learned positions, pre-norm fastattn encoder layers, a linear head."""

    def __init__(self, image_size: int, patch: int, d_model: int, num_heads: int, num_layers: int, num_classes: int):
        super().__init__()
        self.patch = patch
        num_patches = (image_size // patch) ** 2
        self.embed = nn.Linear(patch * patch, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.positions = fastattn.nn.LearnedPositionalEncoding(num_patches + 1, d_model)
        layer = fastattn.nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=2 * d_model, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = fastattn.nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        p = self.patch
        patches = images.unfold(1, p, p).unfold(2, p, p).reshape(B, -1, p * p)  # (B, num_patches, p*p)
        x = torch.cat([self.cls.expand(B, -1, -1), self.embed(patches)], dim=1)
        return self.head(self.encoder(self.positions(x))[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    try:
        images, labels, source = sklearn_digits()
    except ImportError:
        images, labels, source = rendered_digits(seed=args.seed)
    order = torch.randperm(len(images))
    images, labels = images[order].to(args.device), labels[order].to(args.device)
    split = int(0.8 * len(images))
    print(f"data: {source}; {split} training and {len(images) - split} test images")

    patch = 2 if images.shape[-1] == 8 else 3
    model = ViT(images.shape[-1], patch, args.d_model, args.heads, args.layers, 10).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    print(f"model: ViT, {patch}x{patch} patches, {sum(p.numel() for p in model.parameters()):,} parameters")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(split, (args.batch_size,), device=args.device)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        accuracy = (model(images[split:]).argmax(-1) == labels[split:]).float().mean().item()
    print(f"test accuracy {100 * accuracy:.1f}% after {args.steps} steps ({1000 * elapsed / args.steps:.1f} ms/step)")


if __name__ == "__main__":
    main()
