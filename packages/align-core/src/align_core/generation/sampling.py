"""Pure functions that turn next-token logits into tokens.

All functions take ``logits`` of shape ``[B, V]`` (one row per sample, full vocabulary) and return
new tensors; nothing is modified in place and nothing syncs with the host.

Sampling draws exactly one uniform number per sample and step and inverts the cumulative
distribution over token ids (in float64). The uniforms of a sample come from that sample's own
seed (`sample_uniforms`), so a sample's output depends on its prompt, its seed and the model only,
never on which other prompts share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from align_core.generation.config import SamplingConfig

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "block_tokens",
    "choose_tokens",
    "derive_seeds",
    "mask_padded_vocab",
    "sample_from_logprobs",
    "sample_uniforms",
    "sampling_logprobs",
    "token_presence",
    "top_k_filter",
    "top_p_filter",
]

_NEG_INF = float("-inf")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of ids ``>= vocab_size`` (megatron's vocabulary padding) to -inf.

    Args:
        logits: ``[B, V_padded]``.
        vocab_size: The tokenizer's vocabulary size; ids from here on are never sampled.

    Returns:
        ``[B, V_padded]`` logits.
    """
    if vocab_size >= logits.size(-1):
        return logits
    keep = torch.arange(logits.size(-1), device=logits.device) < vocab_size
    return logits.masked_fill(~keep, _NEG_INF)


def token_presence(tokens: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Which token ids occur in each row.

    Args:
        tokens: ``[B, T]`` token ids.
        valid: ``[B, T]`` bool, False where ``tokens`` is padding.
        vocab_size: Width of the result (the padded vocabulary size of the logits).

    Returns:
        ``[B, vocab_size]`` bool, True where the id occurs at a valid position of the row.
    """
    counts = torch.zeros(tokens.size(0), vocab_size, dtype=torch.long, device=tokens.device)
    counts.scatter_add_(1, tokens.clamp(0, vocab_size - 1), valid.long())
    return counts > 0


def apply_repetition_penalty(
    logits: torch.Tensor, presence: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, eq. in §4.1; as in NeMo and HF).

    For every id ``v`` present in the row: ``z_v ← z_v / penalty`` if ``z_v > 0`` else
    ``z_v · penalty``. Other logits are unchanged; ``penalty = 1`` is the identity.

    Args:
        logits: ``[B, V]``.
        presence: ``[B, V]`` bool, the ids already in the prompt or response (`token_presence`).
        penalty: The penalty (> 1 discourages repeats, < 1 encourages them).

    Returns:
        ``[B, V]`` logits.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(presence, penalised, logits)


def block_tokens(
    logits: torch.Tensor, token_ids: Sequence[int], rows: torch.Tensor
) -> torch.Tensor:
    """Forbid ``token_ids`` in the selected rows (used to hold back EOS before ``min_length``).

    Args:
        logits: ``[B, V]``.
        token_ids: Ids to forbid.
        rows: ``[B]`` bool, the rows where they are forbidden.

    Returns:
        ``[B, V]`` logits with -inf at ``(row, id)`` for the selected rows and ids.
    """
    if not token_ids:
        return logits
    ids = torch.as_tensor(list(token_ids), device=logits.device, dtype=torch.long)
    columns = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
    columns[ids] = True
    return logits.masked_fill(rows[:, None] & columns[None, :], _NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by ``temperature`` (> 0)."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (ties broken by `torch.topk`); 0 keeps all.

    Args:
        logits: ``[B, V]``.
        k: Tokens kept per row; 0 or ``>= V`` disables the filter.

    Returns:
        ``[B, V]`` logits with -inf outside the top ``k``.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    index = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    return logits.masked_fill(~keep, _NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the most likely tokens up to mass ``p``.

    In descending order of probability, a token is kept when the mass of the tokens before it is
    below ``p``; so the most likely token is always kept and the kept set is the smallest whose mass
    reaches ``p``.

    Args:
        logits: ``[B, V]``.
        p: Mass in (0, 1]; 1.0 disables the filter.

    Returns:
        ``[B, V]`` logits with -inf outside the nucleus.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = mass_before < p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, _NEG_INF)


def sampling_logprobs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from.

    Greedy: ``log_softmax(logits)``. Sampling: ``log_softmax(top_p(top_k(logits / T)))``. The
    repetition penalty and EOS blocking are applied by the caller before this.

    Args:
        logits: ``[B, V]`` processed logits.
        config: Sampling settings.

    Returns:
        ``[B, V]`` float32 log-probabilities (-inf for excluded tokens).
    """
    logits = logits.float()
    if not config.use_greedy:
        logits = apply_temperature(logits, config.temperature)
        logits = top_k_filter(logits, config.top_k)
        logits = top_p_filter(logits, config.top_p)
    return torch.log_softmax(logits, dim=-1)


def sample_from_logprobs(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row by inverting the cumulative distribution at ``uniforms``.

    Row ``b`` returns the smallest id ``v`` with ``Σ_{u≤v} p_u > U_b · Σ_u p_u`` (float64), which is
    distributed as ``p``. Ids with probability 0 are never returned.

    Args:
        logprobs: ``[B, V]`` log-probabilities (rows need not be exactly normalised).
        uniforms: ``[B]`` numbers in [0, 1).

    Returns:
        ``[B]`` int64 ids.
    """
    cdf = torch.cumsum(logprobs.double().exp(), dim=-1)
    total = cdf[:, -1:]
    target = uniforms.to(cdf)[:, None] * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def choose_tokens(
    logits: torch.Tensor, config: SamplingConfig, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row and its log-probability under the sampling distribution.

    Args:
        logits: ``[B, V]`` logits after the padded-vocabulary mask, repetition penalty and EOS
            blocking.
        config: Sampling settings.
        uniforms: ``[B]`` numbers in [0, 1) (ignored, and may be None, when greedy).

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``.
    """
    logprobs = sampling_logprobs(logits, config)
    if config.use_greedy:
        tokens = torch.argmax(logprobs, dim=-1)
    else:
        if uniforms is None:
            raise ValueError("sampling needs uniforms (one per row)")
        tokens = sample_from_logprobs(logprobs, uniforms)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def derive_seeds(seed: int, batch_size: int) -> list[int]:
    """Per-sample seeds derived from one call seed (distinct across samples and call seeds)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()


def sample_uniforms(seeds: Sequence[int], steps: int, device: torch.device | str) -> torch.Tensor:
    """The uniform numbers a sampled generation consumes: row ``b`` from seed ``seeds[b]`` alone.

    Drawn on the CPU (so CPU and GPU runs of the same seeds use the same numbers), then moved.

    Args:
        seeds: One seed per sample.
        steps: Uniforms per sample (the most tokens a sample can generate).
        device: Where the result goes.

    Returns:
        ``[B, steps]`` float64 uniforms in [0, 1).
    """
    rows = [
        torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        for s in seeds
    ]
    if not rows:
        return torch.empty(0, steps, dtype=torch.float64, device=device)
    return torch.stack(rows).to(device)
