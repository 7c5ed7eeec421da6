"""Nearest-neighbour queue lookup. (Placeholder: torch path only; the Triton kernel lands in issue 5.)"""
import torch

from kernels.dispatch import resolve


def nn_topk(queries, queue, k=1, query_ids=None, queue_ids=None, backend=None):
    """Per query, the k most similar queue rows by cosine similarity, sorted descending.

    queries (B, D), queue (Q, D) → values (B, k) float32, indices (B, k) int64.
    Queue rows whose id equals the query's id are excluded; missing results are (-inf, -1).
    """
    resolve("nn_topk", backend, queries.device)
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    bank = torch.nn.functional.normalize(queue.float(), dim=1)
    sim = q @ bank.T
    if query_ids is not None and queue_ids is not None:
        sim = sim.masked_fill(query_ids[:, None] == queue_ids[None, :], float("-inf"))
    kk = min(k, sim.shape[1])
    values, indices = sim.topk(kk, dim=1)
    indices = indices.masked_fill(values == float("-inf"), -1)
    if kk < k:
        pad = k - kk
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), -1)], 1)
    return values, indices
