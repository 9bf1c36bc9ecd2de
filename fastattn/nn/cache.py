"""Preallocated key/value caches for :class:`fastattn.nn.Attention`: :class:`StaticKVCache` (one
contiguous row per sequence) and :class:`PagedKVCache` (a pool of fixed-size pages handed out as
sequences grow). Both append in place and attend through :func:`fastattn.attention_with_kvcache`.

They are inference caches: the in-place append cannot carry gradients from one step to the next,
so a call that would need gradients raises; :class:`fastattn.nn.KVCache` is the differentiable one.
"""

from __future__ import annotations

import copy

import torch

from ..kvcache import attention_with_kvcache


class _PreallocatedKVCache:
    """What both caches share: the key/value storage, the per-sequence lengths (on the host for the
    checks and the page allocator, and on the cache's device for the kernels), row selection and
    the append-and-attend step. Subclasses say how positions map to storage."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, value_dim: int | None, dtype, device) -> None:
        for value, name in ((batch, "batch"), (num_kv_heads, "num_kv_heads"), (head_dim, "head_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        value_dim = head_dim if value_dim is None else value_dim
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.batch, self.num_kv_heads, self.head_dim, self.value_dim = batch, num_kv_heads, head_dim, value_dim
        self.dtype, self.device = dtype, torch.device("cpu" if device is None else device)
        self._lengths = [0] * batch  # host copy of the valid tokens per sequence
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)  # (batch,)
        self._rows: list[int] | None = None  # None: every row, in order

    # --- rows -----------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        """The sequences (cache rows) this object addresses, in the batch order of the inputs."""
        return list(range(self.batch)) if self._rows is None else list(self._rows)

    def select(self, rows) -> _PreallocatedKVCache:
        """A view of some sequences sharing this cache's storage and lengths: pass it as ``cache=``
        with inputs whose batch is ``len(rows)``. Prefilling prompts of different lengths is one
        call per prompt (``cache.select([b])``); decoding then runs on the whole cache.

        Args:
            rows: sequence indices (ints in ``[0, batch)``, no repeats).
        """
        rows = [int(r) for r in rows]
        if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= self.batch:
            raise ValueError(f"rows must be distinct sequence indices in [0, {self.batch}), got {rows}")
        view = copy.copy(self)  # shares the tensors and the host lists, which are only changed in place
        view._rows = rows
        return view

    @property
    def lengths(self) -> list[int]:
        """Valid tokens of each selected sequence."""
        return [self._lengths[r] for r in self.rows]

    def positions(self) -> torch.Tensor:
        """int32 ``(B,)``: the position of the next token of each selected sequence (its length)."""
        if self._rows is None:
            return self.cache_seqlens
        return self.cache_seqlens[torch.tensor(self._rows, device=self.device)]

    def reset(self) -> None:
        """Forget the selected sequences (their lengths become 0; a paged cache frees their pages)."""
        for r in self.rows:
            self._lengths[r] = 0
            self._release(r)
        self._sync()

    # --- the step ---------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """Append ``k``/``v`` for the selected sequences, attend from ``q`` and advance the lengths.

        Args:
            q: ``(B, L, Hq, D)`` at positions ``length_b .. length_b + L - 1`` (already rotated).
            k: ``(B, L, Hkv, D)``; v: ``(B, L, Hkv, Dv)``.
            **kwargs: ``causal``, ``window``, ``alibi_slopes``, ``softcap``, ``sinks`` for
                :func:`fastattn.attention_with_kvcache`.

        Returns:
            ``(B, L, Hq, Dv)``.
        """
        self._check(q, k, v)
        rows, L = self.rows, q.shape[1]
        self._reserve(rows, L)  # raises before anything is written
        out = attention_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=self.positions(),
                                     **self._storage_kwargs(), **kwargs)
        for r in rows:
            self._lengths[r] += L
        self._sync()
        return out

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise if ``q``/``k``/``v`` do not fit this cache (batch, dtype, device, heads) or need gradients."""
        name = type(self).__name__
        B = q.shape[0]
        if B != len(self.rows):
            raise ValueError(f"cache: the input has batch {B} but this {name} addresses {len(self.rows)} sequences "
                             f"(use cache.select(rows) for a subset)")
        if q.dtype != self.dtype:
            raise TypeError(f"cache: this {name} holds {self.dtype} but the layer computes in {q.dtype}; build "
                            f"the cache with dtype={q.dtype}")
        if q.device != self.device:
            raise ValueError(f"cache: this {name} lives on {self.device} but the input is on {q.device}")
        if tuple(k.shape[2:]) != (self.num_kv_heads, self.head_dim) or v.shape[3] != self.value_dim:
            raise ValueError(f"cache: this {name} holds (num_kv_heads, head_dim) = "
                             f"{(self.num_kv_heads, self.head_dim)} and value_dim {self.value_dim}, the layer "
                             f"gives keys {tuple(k.shape[2:])} and value_dim {v.shape[3]}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(f"cache: a {name} appends in place and cannot carry gradients; run under "
                               f"torch.no_grad() / torch.inference_mode(), or use fastattn.nn.KVCache")

    def _sync(self) -> None:
        """Copy the host lengths to the device tensor the kernels read."""
        self.cache_seqlens.copy_(torch.tensor(self._lengths, dtype=torch.int32))

    def _reserve(self, rows: list[int], new: int) -> None:  # pragma: no cover - overridden
        """Make room for ``new`` more tokens in each of ``rows``, or raise without changing anything."""
        raise NotImplementedError

    def _release(self, row: int) -> None:
        pass

    def _storage_kwargs(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError


class StaticKVCache(_PreallocatedKVCache):
    """One contiguous row of ``max_len`` positions per sequence, for one :class:`Attention` layer.

    ``k_cache (batch, max_len, Hkv, D)`` and ``v_cache (batch, max_len, Hkv, Dv)`` are allocated
    once; each forward with ``cache=`` writes the new tokens at each sequence's length and attends
    to everything before them (bottom-right causal, rotary positions continuing). Use one cache per
    layer.

    Args:
        batch: number of sequences.
        max_len: positions per sequence; a forward that would pass it raises.
        num_kv_heads: ``Hkv`` of the layer. head_dim: ``D``. value_dim: ``Dv``, default ``D``.
        dtype: the layer's compute dtype (default: torch's default dtype). device: default CPU.

    Example::

        caches = [StaticKVCache(2, 128, 2, 16) for _ in layers]
        with torch.no_grad():
            for layer, cache in zip(layers, caches):
                h = layer(h, cache=cache)
    """

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, value_dim: int | None = None,
                 dtype=None, device=None) -> None:
        super().__init__(batch, num_kv_heads, head_dim, value_dim, dtype, device)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        factory = {"dtype": self.dtype, "device": self.device}
        self.k_cache = torch.zeros(batch, max_len, num_kv_heads, head_dim, **factory)
        self.v_cache = torch.zeros(batch, max_len, num_kv_heads, self.value_dim, **factory)

    def _reserve(self, rows: list[int], new: int) -> None:
        for row in rows:
            if self._lengths[row] + new > self.max_len:
                raise ValueError(f"cache: sequence {row} would hold {self._lengths[row] + new} tokens, more than "
                                 f"max_len={self.max_len} of this StaticKVCache")

    def _storage_kwargs(self) -> dict:
        if self._rows is None:
            return {}
        return {"cache_batch_idx": torch.tensor(self._rows, dtype=torch.int32, device=self.device)}


class PagedKVCache(_PreallocatedKVCache):
    """A pool of ``num_pages`` pages of ``page_size`` positions shared by the sequences, for one
    :class:`Attention` layer.

    ``k_cache (num_pages, page_size, Hkv, D)`` and ``v_cache`` are allocated once. A sequence gets a
    page from the free list whenever it grows past its last page (``block_table[b, p]`` is page
    ``p`` of sequence ``b``; -1 where none yet), so memory follows the actual lengths, not the
    longest possible one. :meth:`reset` returns a sequence's pages. Pages are taken from the front
    of ``free_pages`` (a list you may reorder).

    Args:
        batch: number of sequences.
        num_pages: pages in the pool; a forward that needs more than the free ones raises.
        page_size: positions per page, a positive multiple of 16.
        num_kv_heads: ``Hkv``. head_dim: ``D``. value_dim: ``Dv``, default ``D``.
        max_pages_per_seq: columns of ``block_table`` (the most pages one sequence may hold).
            Default ``num_pages``.
        dtype: the layer's compute dtype (default: torch's default dtype). device: default CPU.
    """

    def __init__(self, batch: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 value_dim: int | None = None, max_pages_per_seq: int | None = None, dtype=None,
                 device=None) -> None:
        super().__init__(batch, num_kv_heads, head_dim, value_dim, dtype, device)
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages <= 0:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0 or page_size % 16:
            raise ValueError(f"page_size must be a positive multiple of 16, got {page_size!r}")
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        if isinstance(max_pages_per_seq, bool) or not isinstance(max_pages_per_seq, int) or max_pages_per_seq <= 0:
            raise ValueError(f"max_pages_per_seq must be a positive int, got {max_pages_per_seq!r}")
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        factory = {"dtype": self.dtype, "device": self.device}
        self.k_cache = torch.zeros(num_pages, page_size, num_kv_heads, head_dim, **factory)
        self.v_cache = torch.zeros(num_pages, page_size, num_kv_heads, self.value_dim, **factory)
        self.free_pages = list(range(num_pages))
        self._pages: list[list[int]] = [[] for _ in range(batch)]  # host copy of block_table's used entries
        self.block_table = torch.full((batch, max_pages_per_seq), -1, dtype=torch.int32, device=self.device)

    def _reserve(self, rows: list[int], new: int) -> None:
        needs = {}
        for row in rows:
            length = self._lengths[row] + new
            pages = -(-length // self.page_size)
            if pages > self.max_pages_per_seq:
                raise ValueError(f"cache: sequence {row} would hold {length} tokens, more than max_pages_per_seq="
                                 f"{self.max_pages_per_seq} pages of {self.page_size} in this PagedKVCache")
            needs[row] = max(0, pages - len(self._pages[row]))
        if sum(needs.values()) > len(self.free_pages):
            raise ValueError(f"cache: out of pages: the step needs {sum(needs.values())} more page(s) of "
                             f"{self.page_size}, {len(self.free_pages)} of num_pages={self.num_pages} are free")
        for row, need in needs.items():
            if need:
                pages = self._pages[row]
                start = len(pages)
                pages.extend(self.free_pages[:need])
                del self.free_pages[:need]
                self.block_table[row, start:len(pages)] = torch.tensor(pages[start:], dtype=torch.int32)

    def _release(self, row: int) -> None:
        self.free_pages.extend(self._pages[row])
        self._pages[row].clear()
        self.block_table[row] = -1

    def _storage_kwargs(self) -> dict:
        if self._rows is None:
            return {"block_table": self.block_table}
        return {"block_table": self.block_table[torch.tensor(self._rows, device=self.device)]}
