import torch

from .helpers import check_against_reference, make_qkv


def test_reference_backend_passes_its_own_check():
    q, k, v = make_qkv(2, 4, 2, 17, 23, 16)
    mask = torch.randn(17, 23, requires_grad=True)
    check_against_reference("reference", q, k, v, causal=True, attn_mask=mask, softcap=3.0, dropout_p=0.2)
