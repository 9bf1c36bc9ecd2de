"""attn_implementation="fastattn" on small randomly initialised Hugging Face models built from
configs (nothing downloaded): logits against the float64 SDPA model with the tolerance rule
(no worse than twice SDPA's own float32 error), and greedy generate() with the KV cache."""

import subprocess
import sys

import pytest
import torch

import fastattn
import fastattn.patching

from .tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")
fastattn_hf = pytest.importorskip("fastattn.integrations.transformers")

VOCAB = 101


def llama():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64,
    )


def mistral_sliding():
    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, max_position_embeddings=64,
    )


def gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def bert():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64,
    )


@pytest.fixture(autouse=True)
def _register():
    fastattn_hf.register()


@pytest.fixture
def attention_calls(monkeypatch):
    calls = []
    real = fastattn.attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "attention", counting)
    return calls


def build(config, auto, implementation, dtype=torch.float32):
    torch.manual_seed(0)
    config.pad_token_id = 0
    model = getattr(transformers, auto).from_config(config, attn_implementation=implementation, dtype=dtype)
    return model.eval()


def batch(padding_side):
    ids = torch.randint(3, VOCAB, (3, 13))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 4), (2, 7)) if padding_side != "none" else ():
        if padding_side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, -pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


MODELS = [
    pytest.param(llama, "AutoModelForCausalLM", "left", id="llama-GQA-rope-leftpad"),
    pytest.param(llama, "AutoModelForCausalLM", "none", id="llama-GQA-rope-nopad-causal-flag"),
    pytest.param(mistral_sliding, "AutoModelForCausalLM", "left", id="mistral-sliding5-leftpad"),
    pytest.param(gpt2, "AutoModelForCausalLM", "left", id="gpt2-leftpad"),
    pytest.param(bert, "AutoModel", "right", id="bert-rightpad"),
]


@pytest.mark.parametrize("make_config, auto, padding_side", MODELS)
def test_logits_match(make_config, auto, padding_side, attention_calls):
    ids, mask = batch(padding_side)
    ref64 = logits(build(make_config(), auto, "sdpa", torch.float64), ids, mask)
    model = build(make_config(), auto, "sdpa")
    sdpa = logits(model, ids, mask)
    model.set_attn_implementation("fastattn")
    ours = logits(model, ids, mask)
    assert attention_calls, "the model did not call fastattn"
    # Query rows at padded positions are not compared: they see nothing under a causal mask (fastattn
    # returns 0 there, as documented) and no one reads them.
    keep = mask.bool()
    assert_close_to_reference("logits", ours[keep], ref64[keep], sdpa[keep])
    assert_close_to_reference("logits(from_config)", logits(build(make_config(), auto, "fastattn"), ids, mask)[keep],
                              ref64[keep], sdpa[keep])


@pytest.mark.parametrize("make_config", [llama, mistral_sliding, gpt2], ids=["llama", "mistral-sliding5", "gpt2"])
def test_greedy_generate_matches_sdpa(make_config, attention_calls):
    ids, mask = batch("left")
    model = build(make_config(), "AutoModelForCausalLM", "sdpa")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.set_attn_implementation("fastattn")
        got = model.generate(ids, **kwargs)
    assert len(attention_calls) >= 8 * model.config.num_hidden_layers  # prefill + cached one-token steps
    assert torch.equal(got, want)


def test_import_fastattn_does_not_import_transformers():
    code = "import sys, fastattn, fastattn.nn, fastattn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def falcon():
    return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, multi_query=False)


def test_falcon_cannot_use_the_name_but_runs_under_sdpa_override(monkeypatch):
    """As documented: Falcon looks its attention class up in its own table (no 'fastattn' there); its
    SDPA path runs on fastattn inside sdpa_override, matching SDPA."""
    with pytest.raises(KeyError, match="fastattn"):
        build(falcon(), "AutoModelForCausalLM", "fastattn")
    ids, mask = batch("none")
    ref64 = logits(build(falcon(), "AutoModelForCausalLM", "sdpa", torch.float64), ids, mask)
    model = build(falcon(), "AutoModelForCausalLM", "sdpa")
    sdpa = logits(model, ids, mask)
    calls = []
    real = fastattn.scaled_dot_product_attention
    monkeypatch.setattr(fastattn.patching, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    with fastattn.sdpa_override():
        ours = logits(model, ids, mask)
    assert len(calls) == 2, "Falcon's SDPA path did not reach fastattn"
    assert_close_to_reference("logits", ours, ref64, sdpa)


def test_forgetting_register_gives_transformers_error_the_docs_name():
    """The docs quote transformers' message for an unregistered name; keep them in step."""
    code = ("import transformers\n"
            "c = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16)\n"
            "transformers.AutoModel.from_config(c, attn_implementation='fastattn')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    quoted = 'Specified `attn_implementation="fastattn"` is not supported'
    assert quoted in out.stderr
    assert quoted in fastattn_hf.__doc__
