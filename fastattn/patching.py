"""Swapping fastattn into existing models: :func:`patch_model` and :func:`sdpa_override`."""

from __future__ import annotations

import contextlib
import warnings

import torch.nn.functional as F
from torch import nn

from .api import scaled_dot_product_attention


def _decline_torch_fast_path(module, args):
    """A no-op forward pre-hook. ``torch.nn.TransformerEncoderLayer`` skips its fused fast path
    (which reads the attention weights and never calls ``self_attn``) when any submodule has a
    hook, so a patched layer really runs fastattn's attention."""
    return None


def patch_model(model: nn.Module) -> list[str]:
    """Replace every ``torch.nn.MultiheadAttention`` inside ``model`` with :class:`fastattn.nn.MultiheadAttention`.

    Weights, device, dtype and train/eval mode are kept, so the model computes the same function.
    Inside ``torch.nn.TransformerEncoderLayer`` torch has a fused inference fast path that reads
    ``self_attn``'s weights directly; patched layers are made to decline it (a no-op forward
    pre-hook on the new attention module), and ``torch.nn.TransformerEncoder``'s nested-tensor
    path is switched off (``use_nested_tensor = False``) for encoders with patched layers.

    One visible difference: with a ``src_key_padding_mask`` in eval mode, torch's nested-tensor path
    returns zeros at the padded positions; the patched encoder returns what the layers compute for
    those rows (their queries attend to the unpadded keys), as torch's own regular path does.
    Positions that are not padding are unchanged. Mask padded outputs downstream, as usual.

    Hugging Face models have their own attention classes, not ``torch.nn.MultiheadAttention``: use
    :func:`fastattn.integrations.transformers.register` and ``attn_implementation="fastattn"``.
    Models that call ``torch.nn.functional.scaled_dot_product_attention`` themselves: :func:`sdpa_override`.

    Args:
        model: any module. ``model`` itself is not replaced (build one with
            :meth:`fastattn.nn.MultiheadAttention.from_torch` instead).

    Returns:
        The qualified names (as in ``model.named_modules()``) of the replaced modules. When there are
        none, a warning says what to use instead.

    Raises:
        TypeError: ``model`` is not a module, or is a ``torch.nn.MultiheadAttention`` itself.
        ValueError: ``model`` is a Hugging Face model with nothing to replace (the message says how
            to run it on fastattn).
    """
    from .nn import MultiheadAttention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.MultiheadAttention:
        raise TypeError(
            "patch_model replaces submodules; to convert a torch.nn.MultiheadAttention itself, "
            "use fastattn.nn.MultiheadAttention.from_torch(module)"
        )
    targets = [
        (name, module) for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.MultiheadAttention and name
    ]
    replaced: dict[int, MultiheadAttention] = {}  # a module shared by several parents is converted once
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = replaced.get(id(module))
        if new is None:
            new = replaced[id(module)] = MultiheadAttention.from_torch(module)
        if isinstance(parent, nn.TransformerEncoderLayer) and not new._forward_pre_hooks:
            new.register_forward_pre_hook(_decline_torch_fast_path)
        setattr(parent, attr, new)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer.self_attn, MultiheadAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
    if not targets:
        _nothing_replaced(model)
    return [name for name, _ in targets]


def _nothing_replaced(model: nn.Module) -> None:
    from .nn import MultiheadAttention

    if type(model).__module__.startswith("transformers."):
        raise ValueError(
            f"patch_model found no torch.nn.MultiheadAttention in {type(model).__name__}: Hugging Face models "
            "have their own attention classes. Run them on fastattn with "
            "fastattn.integrations.transformers.register(), then attn_implementation='fastattn' in "
            "from_pretrained/from_config, or model.set_attn_implementation('fastattn')"
        )
    if not any(isinstance(m, MultiheadAttention) for m in model.modules()):
        warnings.warn(
            f"patch_model found no torch.nn.MultiheadAttention in {type(model).__name__}, so nothing was replaced. "
            "For a model that calls torch.nn.functional.scaled_dot_product_attention, use "
            "`with fastattn.sdpa_override():`", stacklevel=3,
        )


@contextlib.contextmanager
def sdpa_override():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through :func:`fastattn.scaled_dot_product_attention`.

    Inside the ``with`` block every call that looks the function up on ``torch.nn.functional``
    (Hugging Face's ``"sdpa"`` attention, most hand-written models) runs on fastattn; the original
    is restored on exit, also when the block raises. Not rerouted: code that imported the function
    by name before the block (``from torch.nn.functional import scaled_dot_product_attention``)
    keeps its own reference; and the fused inference fast path of ``torch.nn.MultiheadAttention``
    and ``torch.nn.TransformerEncoderLayer`` (eval mode under ``torch.no_grad()``, when torch's
    conditions for it hold: batch-first, an even number of heads, ...) runs in C++ and never looks
    it up, so their attention stays torch's there. Use :func:`patch_model` for those modules. Not thread-safe: the swap is
    process-wide while the block runs.

    Example::

        with fastattn.sdpa_override():
            logits = model(input_ids).logits
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


__all__ = ["patch_model", "sdpa_override"]
