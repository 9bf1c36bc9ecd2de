"""Helpers shared by the backend tests: random inputs and a backend-vs-reference check."""

from __future__ import annotations

import torch

import fastattn
from fastattn import reference
from fastattn.autograd import block_args, effective_attn_mask

from .tolerance import assert_close_to_reference, high_precision


def make_qkv(B, Hq, Hkv, Lq, Lk, D, *, dtype=torch.float32, device="cpu", Dv=None, requires_grad=True):
    """Random ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``."""
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Lk, Dv or D, dtype=dtype, device=device)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def op_args(q, k, v, *, backend: str | None = None, seed: int = 0, **kwargs) -> tuple[list, list]:
    """The forward op's arguments (FWD_SCHEMA order) for ``fastattn.attention(q, k, v, **kwargs)`` as
    ``backend`` receives them, and the ten block tensors :func:`bwd_op_args` needs."""
    inputs = fastattn._inputs.normalize(q, k, v, **kwargs)
    lists, bq, bk = block_args(inputs, backend)
    fwd = [
        inputs.q, inputs.k, inputs.v, effective_attn_mask(inputs, backend), inputs.alibi_slopes, inputs.key_lengths,
        inputs.query_lengths, *lists[:4], *lists[8:], bq, bk, inputs.scale, inputs.window_left, inputs.window_right,
        inputs.softcap, inputs.dropout_p, seed,
    ]
    return fwd, lists


def bwd_op_args(fwd: list, lists: list, out, lse, compute_dbias: bool = False) -> list:
    """The backward op's arguments (BWD_SCHEMA order) after the forward op gave ``out, lse``."""
    return [torch.randn_like(out), *fwd[:3], out, lse, *fwd[3:7], *lists, *fwd[13:], compute_dbias]


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.detach().to(dtype).requires_grad_(value.requires_grad)
    return value


def check_against_reference(backend: str, q, k, v, *, grads: bool = True, **kwargs) -> torch.Tensor:
    """Run ``fastattn.attention(q, k, v, backend=backend, **kwargs)`` and check it, and its gradients
    w.r.t. q, k, v (and a float ``attn_mask`` that requires grad), against the reference with the
    tolerance rule. Dropout is checked given the backend's own dropout pattern. Returns the output.
    """
    hp = high_precision(q.dtype)
    leaves = [q, k, v]
    mask = kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.requires_grad:
        leaves.append(mask)
    dropout_p = kwargs.get("dropout_p", 0.0)

    seed_state = torch.random.get_rng_state()
    out = fastattn.attention(q, k, v, backend=backend, **kwargs)
    ref_kwargs = dict(kwargs)
    if dropout_p > 0:
        # Replay the seed the call drew, and ask the backend for the pattern it applied.
        torch.random.set_rng_state(seed_state)
        seed = reference.draw_seed()
        inputs = fastattn._inputs.normalize(q, k, v, **kwargs)
        ref_kwargs["dropout_keep"] = fastattn.get_backend(backend).dropout_keep_mask(inputs, seed)

    hp_args = [t.detach().to(hp).requires_grad_() for t in leaves]
    hp_kwargs = {key: _cast(val, hp) for key, val in ref_kwargs.items()}
    lp_args = [t.detach().clone().requires_grad_() for t in leaves]
    lp_kwargs = dict(ref_kwargs)
    if len(leaves) == 4:
        hp_kwargs["attn_mask"], lp_kwargs["attn_mask"] = hp_args[3], lp_args[3]
    ref32 = reference.attention(*hp_args[:3], **hp_kwargs)
    ref_lp = reference.attention(*lp_args[:3], **lp_kwargs)
    assert_close_to_reference("out", out, ref32, ref_lp)
    if not grads:
        return out

    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want32 = torch.autograd.grad(ref32, hp_args, dout.to(hp))
    want_lp = torch.autograd.grad(ref_lp, lp_args, dout)
    for name, g, w32, wlp in zip(("dq", "dk", "dv", "dmask"), got, want32, want_lp):
        assert_close_to_reference(name, g, w32, wlp)
    return out
