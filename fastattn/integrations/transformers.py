"""Hugging Face transformers integration: ``attn_implementation="fastattn"``.

::

    import fastattn.integrations.transformers as fastattn_hf
    fastattn_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")
    model.set_attn_implementation("fastattn")      # or switch an existing model

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and, where the
installed version has ``AttentionMaskInterface``, transformers' own SDPA mask builder under the
same name: masks arrive as bool ``(B, 1, Lq, Lk)`` (True = attend; causal, sliding-window and
padding patterns already combined) or as None when plain causal attention suffices, which
then runs as ``causal=True`` with no mask at all. GQA runs natively (no ``repeat_kv``).

Padding-free packed batches (``DataCollatorWithFlattening``: one row of concatenated documents,
``position_ids`` restarting at each, no attention mask) run through :func:`fastattn.varlen_attention`:
each document attends only to itself and nothing is padded (see :func:`packed_documents` for how
such a call is recognised). transformers itself still builds its ``(L, L)`` mask for the packing
before calling the attention function; fastattn does not read it.

transformers is an optional dependency: this module imports it, ``import fastattn`` never does.

Forgot :func:`register`? transformers then answers
``Specified `attn_implementation="fastattn"` is not supported. The only possible arguments are ...``:
call ``register()`` first, once per process.
(``fastattn.patch_model`` does not apply: it replaces ``torch.nn.MultiheadAttention``, which
Hugging Face models do not use, and says so.)

Which architectures work. Every model whose attention goes through transformers' attention
interface (``ALL_ATTENTION_FUNCTIONS``; the model class sets ``_supports_attention_backend``) --
most current ones: Llama, Mistral (with sliding windows), Qwen2/3, Gemma 2 (softcap), Phi, GPT-2,
BERT, gpt-oss (attention sinks, ``s_aux``) and many more; Llama, Mistral, GPT-2 and BERT are checked
against SDPA in fastattn's tests, gpt-oss against its eager attention (tests/test_sinks.py).
Which cannot: models that pick their attention class from their own table keyed by the
implementation name, so an added name is unknown to them. With transformers 5.24 these are Falcon
(``KeyError: 'fastattn'``), GPT-Neo, Bark, GIT, Data2Vec-Vision, SAM / SAM-HQ vision, SuperGlue and
two OCR models; models without the attention interface are refused by transformers itself. For
those with an SDPA path use ``attn_implementation="sdpa"`` inside ``with fastattn.sdpa_override():``
instead -- checked for Falcon with one K/V head per query head; Falcon's multi-query default
hands SDPA a single K/V head to broadcast, which ``fastattn.scaled_dot_product_attention``
refuses (it asks for ``enable_gqa=True``), so that configuration stays on torch's SDPA.
"""

from __future__ import annotations

import torch

import fastattn

NAME = "fastattn"


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by :func:`fastattn.attention`.

    Args:
        module: the calling attention layer (its ``is_causal`` attribute is the default).
        query: ``(B, Hq, Lq, D)``. key, value: ``(B, Hkv, Lk, D)`` (GQA when ``Hkv < Hq``).
        attention_mask: bool (True = attend) or additive float, broadcastable to
            ``(B, Hq, Lq, Lk)``, or None.
        dropout: attention dropout (transformers passes 0 in eval mode). scaling: score scale.
        is_causal: overrides ``module.is_causal``; causal applies only without a mask and with
            ``Lq > 1``, as in transformers' SDPA path.
        softcap: score soft-capping (Gemma 2), fused in the kernel.
        position_bias: additive bias (T5-style models), folded into the mask.
        kwargs: the rest of transformers' keywords (``sliding_window`` is already in the mask).
            ``s_aux``: gpt-oss's per-head attention sinks ``(Hq,)``, passed as ``sinks``.

    Returns:
        ``(out (B, Lq, Hq, D), None)``: attention weights are never materialised.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = packed_documents(query, key, attention_mask, position_bias, kwargs)
    if packed is not None:
        return packed_attention_forward(query, key, value, *packed, causal=bool(causal), dropout=dropout,
                                        scaling=scaling, softcap=softcap, sliding_window=kwargs.get("sliding_window"))
    causal = bool(causal) and q_len > 1 and attention_mask is None
    if causal and kv_len > q_len:
        # Prefill into an empty static cache: the tail of the cache is unused (transformers'
        # SDPA path crops it the same way), and the remaining square is plain causal.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = position_bias + attention_mask
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    out = fastattn.attention(
        query, key, value,
        causal=causal,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        softcap=softcap or 0.0,
        sinks=kwargs.get("s_aux"),  # gpt-oss attention sinks
    )  # (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous(), None


# ---- Padding-free packed batches (DataCollatorWithFlattening) -> fastattn.varlen_attention ----
def packed_documents(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    kwargs: dict,
) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens, max_seqlen)`` when this call is a padding-free packed batch, else None.

    Recognised as transformers' own flash-attention path does: one row of tokens (batch 1) with no
    KV cache in play (``Lq == Lk``), documents given either by the collator's ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` keywords (``return_flash_attn_kwargs=True``) or by ``position_ids`` that
    restart (a position that does not follow its predecessor by 1 starts a document), and no
    padding mask from the caller. transformers still hands the attention function the mask it built
    for the packing (same-document and causal, bool); that mask is recognised, not read whole: the
    first token of each document must not see the token before it (with a caller's padding mask and
    no packing, it would).
    """
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    if position_bias is not None or kwargs.get("s_aux") is not None:
        return None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return None
    L = query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k, cu):
            return None
        cu = cu.to(device=query.device, dtype=torch.int32)
        starts = cu[1:-1].long()
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape[-1] != L:
            return None
        positions = position_ids.reshape(-1, L)[0]
        starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1  # (num_docs - 1,)
        cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), L)]).to(torch.int32)
    if starts.numel() == 0:
        return None  # one document: the plain path
    if attention_mask is not None and bool(attention_mask[0, 0, starts, starts - 1].any()):
        return None  # documents see each other: not transformers' packed mask
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    dropout: float,
    scaling: float | None,
    softcap: float | None,
    sliding_window: int | None,
) -> tuple[torch.Tensor, None]:
    """One packed row ``query (1, Hq, L, D)``, ``key``/``value (1, Hkv, L, D)`` through
    :func:`fastattn.varlen_attention`: each document attends only to itself, with no padding and no
    ``(L, L)`` mask. ``sliding_window`` is transformers' (key ``j`` visible from ``i`` iff
    ``j > i - sliding_window``). Returns ``(out (1, L, Hq, D), None)``."""
    window = (sliding_window - 1, -1) if sliding_window else None
    out = fastattn.varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        causal=causal, window=window, dropout_p=dropout, scale=scaling, softcap=softcap or 0.0,
    )  # (L, Hq, D)
    return out[None], None


def register() -> None:
    """Register ``"fastattn"`` with transformers (idempotent). Raises ImportError without transformers."""
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(
            "fastattn.integrations.transformers needs Hugging Face transformers: pip install 'fastattn[hf]'"
        ) from exc
    AttentionInterface.register(NAME, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older transformers: models build their own masks
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)


__all__ = ["NAME", "attention_forward", "register"]
