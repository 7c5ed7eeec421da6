"""Group-masked attention. (Placeholder: torch paths only; the Triton kernel lands in issue 8.)

attention(q, k, v, groups=None): q, k, v (B, H, N, d); groups (B, N) int, token i attends to
token j iff groups[b, i] == groups[b, j]; a negative id is padding (output 0).
"""
import torch
import torch.nn.functional as F

from kernels.dispatch import resolve


def attention_reference(q, k, v, groups=None):
    """Torch reference: masked softmax attention; padded (negative-id) rows give 0, never NaN."""
    if groups is None:
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale                 # (B, H, N, N)
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, None, :] >= 0)   # (B, N, N)
    scores = scores.masked_fill(~same[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)               # all-masked rows → 0
    return (probs.to(v.dtype) @ v)


def attention(q, k, v, groups=None, backend=None):
    if groups is None:
        return F.scaled_dot_product_attention(q, k, v)
    resolve("attention", backend, q.device)
    return attention_reference(q, k, v, groups)
