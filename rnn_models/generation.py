"""Choosing the next token from logits: greedy (temperature 0), temperature and top-k sampling."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One index (shape (1,)) drawn from ``logits`` (V,).

    temperature 0 is greedy (argmax); top_k > 0 keeps only the k most likely tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # sample on the CPU so a seed gives the same text whatever device the model is on
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def complete(model, vocab, prefix: str, max_new: int, temperature: float = 1.0, top_k: int = 0,
             seed: int | None = None) -> str:
    """``prefix`` followed by ``max_new`` generated characters. Characters the vocabulary has
    never seen are read as ``<unk>``; ``seed`` makes the text reproducible."""
    if not prefix:
        raise ValueError("prefix is empty; generation needs at least one character to start from")
    device = next(model.parameters()).device
    ids = torch.tensor(vocab.encode(prefix), dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(seed) if seed is not None and seed >= 0 else None
    out = model.generate(ids, max_new, temperature, top_k, gen)
    return prefix + vocab.decode(out.tolist())
