"""PNG plots of a results document (matplotlib, headless; optional: without it there are no plots)."""

from __future__ import annotations

from pathlib import Path

NO_MATPLOTLIB = "matplotlib is not installed: pip install matplotlib (or 'fastattn[bench]')"


def plotting_unavailable() -> str | None:
    """Why no plot can be drawn here (matplotlib missing), or None when plots work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return NO_MATPLOTLIB
    return None


def _pyplot():
    reason = plotting_unavailable()
    if reason is not None:
        raise ImportError(reason)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Lines that coincide (sdpa and the sdpa backend it picked, say) stay visible: each provider gets its
# own marker, dash pattern and marker size, and later lines are drawn thinner over earlier ones.
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "<")
_DASHES = ("-", "--", ":", "-.")


def _style(index: int) -> dict:
    """Matplotlib line keywords for the ``index``-th provider of a plot (stable across its panels)."""
    return {"marker": _MARKERS[index % len(_MARKERS)], "linestyle": _DASHES[index % len(_DASHES)],
            "markersize": max(2.5, 6.0 - 0.5 * index), "linewidth": max(0.8, 1.8 - 0.15 * index),
            "markerfacecolor": "none" if index % 2 else None}


def _order(labels) -> dict[str, int]:
    """A stable style index per line label: the order of first appearance."""
    return {label: i for i, label in enumerate(dict.fromkeys(labels))}


def _log_axis(ax, axis: str) -> None:
    """A log axis (call after drawing) labelled in plain numbers -- at 1-2-5 steps when it spans less
    than two decades, at powers of ten otherwise -- with unlabelled minor ticks (no clutter)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if high < 100 * low else (1.0,)
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(NullFormatter())


def _panels(keys: list, plt, width: float = 4.2, height: float = 3.2):
    n = max(1, len(keys))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=min(5, len(labels)),
                   fontsize=8, frameon=False)


def _title(doc: dict) -> str:
    env = doc["environment"]
    commit = (env.get("commit") or "unknown")[:8]
    return f"{env['device_name']} | torch {env['torch']} | fastattn {env['fastattn']} @ {commit}"


def _save(plt, fig, axes, doc: dict, path: str | Path, rect=(0, 0.08, 1, 0.95)) -> Path:
    """Title, shared legend and layout of a panel figure; writes it to ``path`` (PNG) and closes it."""
    fig.suptitle(_title(doc), fontsize=9)
    _legend(fig, axes)
    fig.tight_layout(rect=rect)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tflops_vs_seqlen(doc: dict, path: str | Path) -> Path | None:
    """TFLOP/s (GFLOP/s on CPU) against sequence length: one panel per (workload, head dim, dtype, mode), one line per provider.

    Block-sparse runs at several densities appear as one line per density. Returns None when
    there is nothing with two or more lengths to draw.
    """
    rows = [r for r in doc["results"] if r["status"] == "ok" and r["tflops"]]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["head_dim"], r["dtype"], r["mode"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["seqlen"] for r in v}) >= 2}
    if not groups:
        return None
    plt = _pyplot()
    # CPU rates read better in GFLOP/s; the numbers are the same TFLOP/s of the results, scaled.
    scale, unit = (1e3, "GFLOP/s") if doc["environment"]["device"] == "cpu" else (1.0, "TFLOP/s")
    keys = sorted(groups, key=str)
    fig, axes = _panels(keys, plt)

    def label_of(r):
        return r["provider"] + (f" density {r['density']:g}" if r["density"] is not None else "")

    style = _order(label_of(r) for k in keys for r in groups[k])
    for ax, key in zip(axes, keys):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in groups[key]:
            lines.setdefault(label_of(r), []).append((r["seqlen"], r["tflops"] * scale))
        for label, points in lines.items():
            points.sort()
            if len(points) >= 2:
                ax.plot(*zip(*points), label=label, **_style(style[label]))
        ax.set_xscale("log", base=2)
        ax.set_title("{} D={} {} {}".format(*key), fontsize=9)
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, axes, doc, path)


def plot_time_vs_density(doc: dict, path: str | Path) -> Path | None:
    """Block-sparse median time against density: one panel per (length, dtype, mode). None if no sweep."""
    rows = [r for r in doc["results"] if r["status"] == "ok" and r["workload"] == "block_sparse"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["seqlen"], r["head_dim"], r["dtype"], r["mode"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["density"] for r in v}) >= 2}
    if not groups:
        return None
    plt = _pyplot()
    keys = sorted(groups, key=str)
    fig, axes = _panels(keys, plt)
    style = _order(r["provider"] for k in keys for r in groups[k])
    for ax, key in zip(axes, keys):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in groups[key]:
            lines.setdefault(r["provider"], []).append((r["density"], r["time_ms"]))
        for label, points in lines.items():
            points.sort()
            ax.plot(*zip(*points), label=label, **_style(style[label]))
        ax.set_title("block-sparse L={} D={} {} {}".format(*key), fontsize=9)
        ax.set_xlabel("density (fraction of visible tiles)", fontsize=8)
        ax.set_ylabel("median time (ms)", fontsize=8)
        _log_axis(ax, "y")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, axes, doc, path)


def plot_memory(doc: dict, path: str | Path) -> Path | None:
    """Peak memory (MiB) against sequence length, log-log: one panel per mode, one line per provider."""
    rows = [r for r in doc["results"] if r["status"] == "ok" and r["peak_mem_bytes"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = _panels(modes, plt, width=5.0, height=3.8)
    style = _order(r["provider"] for r in rows)
    for ax, mode in zip(axes, modes):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["mode"] == mode:
                lines.setdefault(r["provider"], []).append((r["seqlen"], max(r["peak_mem_bytes"], 1) / 2**20))
        for label, points in lines.items():
            points.sort()
            ax.plot(*zip(*points), label=label, **_style(style[label]))
        ax.set_xscale("log", base=2)
        _log_axis(ax, "y")
        r0 = rows[0]
        ax.set_title(f"{mode}: {r0['workload']} B={r0['batch']} H={r0['heads_q']} D={r0['head_dim']} {r0['dtype']}",
                     fontsize=9)
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("peak MiB above inputs", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    return _save(plt, fig, axes, doc, path, rect=(0, 0.1, 1, 0.93))
