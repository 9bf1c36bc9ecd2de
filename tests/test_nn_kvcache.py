"""fastattn.nn.Attention's preallocated caches (StaticKVCache, PagedKVCache): greedy decoding of a tiny
model gives the tokens and logits of the full forward pass and of the concatenating KVCache, with
prompts of different lengths, GQA, shuffled pages; overflow and misuse raise errors naming the cause."""

import random

import pytest
import torch
from torch import nn

from fastattn.nn import Attention, KVCache, PagedKVCache, StaticKVCache

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 37, 32, 4, 2, 2
HEAD_DIM = DIM // HEADS


class TinyLM(nn.Module):
    """Embedding, pre-norm residual attention layers, LM head: enough to make decoding depend on every cached key."""

    def __init__(self, position="rotary", window=None, kv_heads=KV_HEADS, sinks=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(LAYERS))
        self.layers = nn.ModuleList(
            Attention(DIM, HEADS, kv_heads, causal=True, position=position, window=window, sinks=sinks)
            for _ in range(LAYERS)
        )
        if sinks:  # learned-looking sinks: some heads' sinks dominate, some barely count
            with torch.no_grad():
                for layer in self.layers:
                    layer.sinks.copy_(torch.randn(HEADS) * 2)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, caches=None):
        h = self.embed(tokens)
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            h = h + layer(norm(h), cache=None if caches is None else caches[i])
        return self.head(h)  # (B, L, VOCAB)


def full_greedy(model, prompt, steps):
    """No cache: the whole sequence through the model at every step."""
    tokens, logits = prompt, []
    for _ in range(steps):
        last = model(tokens)[:, -1]
        logits.append(last)
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits, 1)


def cached_greedy(model, prompt, steps, caches):
    last = model(prompt, caches)[:, -1]
    tokens, logits = prompt, [last]
    for step in range(steps):
        tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
        if step + 1 < steps:
            last = model(tokens[:, -1:], caches)[:, -1]
            logits.append(last)
    return tokens, torch.stack(logits, 1)


def make_caches(kind, batch, kv_heads=KV_HEADS, shuffle=True):
    if kind == "concat":
        return [KVCache() for _ in range(LAYERS)]
    if kind == "static":
        return [StaticKVCache(batch, 64, kv_heads, HEAD_DIM) for _ in range(LAYERS)]
    caches = [PagedKVCache(batch, 8, 16, kv_heads, HEAD_DIM, max_pages_per_seq=4) for _ in range(LAYERS)]
    if shuffle:
        for i, cache in enumerate(caches):
            random.Random(i).shuffle(cache.free_pages)  # sequences get scattered, non-contiguous pages
    return caches


@pytest.mark.parametrize("kind", ["concat", "static", "paged"])
@pytest.mark.parametrize(
    "position, window, kv_heads",
    [
        pytest.param("rotary", None, KV_HEADS, id="rotary-gqa"),
        pytest.param("alibi", None, 1, id="alibi-mqa"),
        pytest.param("rotary", (6, 0), HEADS, id="rotary-window6-mha"),
    ],
)
def test_greedy_decoding_matches_the_full_forward(kind, position, window, kv_heads):
    torch.manual_seed(0)
    model = TinyLM(position, window, kv_heads).eval()
    prompt = torch.randint(0, VOCAB, (2, 13))  # 13 + 20 tokens: crosses page boundaries at 16 and 32
    with torch.no_grad():
        want_tokens, want_logits = full_greedy(model, prompt, 20)
        caches = make_caches(kind, 2, kv_heads)
        tokens, logits = cached_greedy(model, prompt, 20, caches)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    if kind != "concat":
        assert caches[0].lengths == [32, 32]  # the last token is chosen, not fed back
        assert torch.equal(caches[0].cache_seqlens, torch.tensor([32, 32], dtype=torch.int32))
    if kind == "paged":
        assert len(caches[0].free_pages) == 8 - 4  # two pages per sequence
        used = caches[0].block_table[:, :2].flatten().tolist()
        assert sorted(used) == sorted(set(used)) and caches[0].block_table[:, 2:].tolist() == [[-1, -1]] * 2


@pytest.mark.parametrize("kind", ["concat", "static", "paged"])
@pytest.mark.parametrize("window", [None, (6, 0)], ids=["full", "window6"])
def test_greedy_decoding_with_sinks_matches_the_full_forward(kind, window):
    """Attention(sinks=True): the sinks reach the cached path (attention_with_kvcache) as they reach the
    full forward (fastattn.attention): the same greedy tokens and logits."""
    torch.manual_seed(3)
    model = TinyLM("rotary", window, sinks=True).eval()
    prompt = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        want_tokens, want_logits = full_greedy(model, prompt, 20)
        tokens, logits = cached_greedy(model, prompt, 20, make_caches(kind, 2))
        # The sinks matter: without them the logits differ.
        for layer in model.layers:
            layer.sinks.fill_(-float("inf"))
        _, plain_logits = full_greedy(model, prompt, 20)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain_logits[:, 0], want_logits[:, 0], atol=1e-3)


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_prompts_of_different_lengths(kind):
    """Prefill each prompt on its own row (cache.select), then decode the batch together. The 40-token
    prompt has 80 query rows per key/value head: its prefill takes the composed path, not the decode kernel."""
    torch.manual_seed(1)
    model = TinyLM().eval()
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in (5, 40, 9)]
    steps = 12
    with torch.no_grad():
        want = [full_greedy(model, p, steps) for p in prompts]
        caches = make_caches(kind, 3)
        last = torch.cat([model(p, [c.select([b]) for c in caches])[:, -1] for b, p in enumerate(prompts)])
        generated, logits = [], [last]
        for step in range(steps):
            nxt = last.argmax(-1, keepdim=True)  # (3, 1)
            generated.append(nxt)
            if step + 1 < steps:
                last = model(nxt, caches)[:, -1]
                logits.append(last)
    generated, logits = torch.cat(generated, 1), torch.stack(logits, 1)
    for b, (p, (want_tokens, want_logits)) in enumerate(zip(prompts, want)):
        assert torch.equal(generated[b], want_tokens[0, p.shape[1]:])
        torch.testing.assert_close(logits[b], want_logits[0], atol=1e-4, rtol=1e-4)
    assert caches[0].lengths == [5 + 11, 40 + 11, 9 + 11]


def test_reset_frees_pages_and_a_row_can_be_reused():
    torch.manual_seed(2)
    model = TinyLM().eval()
    caches = make_caches("paged", 2)
    a, b = torch.randint(0, VOCAB, (2, 20)), torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        model(a, caches)
        assert len(caches[0].free_pages) == 4
        for c in caches:
            c.select([1]).reset()
        assert caches[0].lengths == [20, 0] and len(caches[0].free_pages) == 6
        assert caches[0].block_table[1].tolist() == [-1] * 4
        out = model(b[1:], [c.select([1]) for c in caches])  # a new sequence in row 1
        torch.testing.assert_close(out, model(b[1:]), atol=1e-5, rtol=1e-5)


def test_overflow_raises_and_leaves_the_cache_unchanged():
    model = TinyLM().eval()
    x = torch.randn(2, 6, DIM)
    layer = model.layers[0]
    with torch.no_grad():
        static = StaticKVCache(2, 8, KV_HEADS, HEAD_DIM)
        layer(x, cache=static)
        with pytest.raises(ValueError, match="max_len=8"):
            layer(x[:, :3], cache=static)
        assert static.lengths == [6, 6]
        layer(x[:, :2], cache=static)  # exactly full is fine
        assert static.lengths == [8, 8]

        paged = PagedKVCache(2, 3, 16, KV_HEADS, HEAD_DIM)
        layer(torch.randn(2, 16, DIM), cache=paged)  # two pages
        with pytest.raises(ValueError, match="out of pages"):
            layer(x[:, :1], cache=paged)  # both rows need a page, one is free
        assert paged.lengths == [16, 16] and len(paged.free_pages) == 1
        layer(x[:1, :1], cache=paged.select([0]))  # one row fits

        limited = PagedKVCache(1, 8, 16, KV_HEADS, HEAD_DIM, max_pages_per_seq=2)
        with pytest.raises(ValueError, match="max_pages_per_seq=2"):
            layer(torch.randn(1, 33, DIM), cache=limited)


def test_misuse_raises_clear_errors():
    model = TinyLM().eval()
    layer = model.layers[0]
    x = torch.randn(2, 3, DIM)
    cache = StaticKVCache(2, 16, KV_HEADS, HEAD_DIM)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer(x, cache=cache)  # parameters require grad
    with torch.no_grad():
        with pytest.raises(TypeError, match="dtype=torch.float32"):
            layer(x, cache=StaticKVCache(2, 16, KV_HEADS, HEAD_DIM, dtype=torch.float64))
        with pytest.raises(ValueError, match="batch 2 .* 3 sequences"):
            layer(x, cache=StaticKVCache(3, 16, KV_HEADS, HEAD_DIM))
        with pytest.raises(ValueError, match="num_kv_heads"):
            layer(x, cache=StaticKVCache(2, 16, 1, HEAD_DIM))
        with pytest.raises(ValueError, match="attn_mask"):
            layer(x, attn_mask=torch.ones(3, 3, dtype=torch.bool), cache=cache)
        with pytest.raises(ValueError, match="rows"):
            cache.select([0, 0])
        assert cache.lengths == [0, 0]
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 4, 24, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(1, 0, KV_HEADS, HEAD_DIM)
