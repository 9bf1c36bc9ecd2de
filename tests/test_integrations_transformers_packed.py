"""Hugging Face padding-free training (DataCollatorWithFlattening's packed rows) through
fastattn.varlen_attention: a tiny random model's loss and gradients on the packed row equal those of
the same documents run one by one."""

import pytest
import torch

import fastattn

transformers = pytest.importorskip("transformers")
fastattn_hf = pytest.importorskip("fastattn.integrations.transformers")

VOCAB = 97
DOCS = [7, 12, 1, 5]  # a one-token document included


def llama():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64,
    )


def mistral_sliding():
    return transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, max_position_embeddings=64,
    )


@pytest.fixture
def varlen_calls(monkeypatch):
    calls = []
    real = fastattn.varlen_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "varlen_attention", counting)
    return calls


def _model(make_config):
    fastattn_hf.register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="fastattn")
    return model.to(torch.float64).train()


def _loss_and_grads(model, input_ids, position_ids, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=input_ids, position_ids=position_ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make_config", [llama, mistral_sliding], ids=["llama-gqa", "mistral-sliding-window"])
@pytest.mark.parametrize("collator_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_training_step_matches_the_documents_one_by_one(make_config, collator_kwargs, varlen_calls):
    model = _model(make_config)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in DOCS]
    # The collator's packed row: documents concatenated, positions restarting, the first label of
    # each document ignored so no loss crosses a boundary.
    features = [{"input_ids": d.tolist()} for d in docs]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=collator_kwargs)
    batch = collator(features)
    assert batch["input_ids"].shape == (1, sum(DOCS)) and "attention_mask" not in batch
    extra = {}
    if collator_kwargs:
        extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    loss, logits, grads = _loss_and_grads(model, batch["input_ids"], batch["position_ids"], batch["labels"], **extra)
    assert varlen_calls, "the packed row did not run through fastattn.varlen_attention"

    # Unpacked: each document alone; HF's loss is the mean over the counted labels, so weight each
    # document's mean by its share of them.
    varlen_calls.clear()
    counted = [n - 1 for n in DOCS]
    model.zero_grad()
    ref_logits, ref_loss = [], 0.0
    for d, c in zip(docs, counted):
        out = model(input_ids=d[None], labels=d[None], use_cache=False)
        ref_logits.append(out.logits.detach()[0])
        if c:
            ref_loss = ref_loss + out.loss * c / sum(counted)
    ref_loss.backward()
    assert not varlen_calls  # a single document takes the plain path
    torch.testing.assert_close(logits[0], torch.cat(ref_logits), rtol=1e-9, atol=1e-9)
    # transformers computes the loss in float32 (logits upcast), so loss and gradients agree to float32.
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_padding_mask_without_packing_is_not_taken_for_documents(varlen_calls):
    # Restarting position_ids with a caller's padding mask: transformers does not separate the
    # documents then (its mask is causal + padding), and neither does fastattn.
    model = _model(llama).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, -2:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
    assert not varlen_calls
    torch.testing.assert_close(out[0, :-2], ref[0, :-2], rtol=1e-9, atol=1e-9)
