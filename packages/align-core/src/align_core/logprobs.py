"""Per-token label log-probabilities of a megatron-core GPT, vocabulary-parallel.

Two paths, both through `align_losses` with the model's tensor-parallel group:

- **logits** (``fused=False``): the model's output layer produces this rank's vocabulary shard of
  the logits ``[B, S, V_padded / TP]`` and `align_losses.token_logps` reduces it over the
  tensor-parallel group.
- **fused** (``fused=True``, the default): the model is run with its post-processing bypassed so
  it returns the final (normed) hidden states ``[S, B, H]``, and
  `align_losses.chunked_linear_logps` combines them with this rank's rows of the output weight
  (tied to the input embedding or not) chunk by chunk, so ``[B, S, V]`` logits never exist.
  Only scored positions (label not ``ignore_index``) go through the output layer
  (``LogProbConfig.scored_only``): prompts and padding, often more than half of a preference
  batch, cost no output-layer work.

Padded vocabulary. Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by × TP``; the padded rows of the output layer are real parameters that
no label ever names. With ``vocab_size`` given (the tokenizer's size) the padded entries are
excluded from the softmax normaliser, so the log-probs equal those of an unpadded model exactly
and do not depend on the TP size (which changes the amount of padding). With ``vocab_size=None``
they take part in the normaliser as they did in Megatron pre-training; for a trained checkpoint
their logits are driven far down and the difference is below float noise, but for a randomly
initialised model it is not, so callers should pass ``vocab_size``.

Batches are mappings with ``tokens [B, S]`` (int), ``labels [B, S]`` (int, aligned with the
positions: ``labels[:, t]`` is the token predicted at position ``t``, ``-100`` where not scored),
``position_ids [B, S]`` (optional: ``0..S-1``) and ``attention_mask`` (optional: bool,
``[1 or B, 1, S, S]``, True = masked; default causal). They may be host tensors: the forward
functions move what they use to the model's device (`align_core.device.to_device`, a no-op for
the batches `align_core.schedule.forward_backward` has already moved).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from align_core.device import module_device, to_device
from align_core.model import unwrap_model

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

__all__ = [
    "LogProbConfig",
    "causal_attention_mask",
    "final_hidden_states",
    "forward_token_logps",
    "mask_padded_vocab_",
    "output_weight",
    "tensor_parallel_group",
    "token_logps_from_hidden",
    "token_logps_from_logits",
    "vocab_shard_start",
]


@dataclass(frozen=True)
class LogProbConfig:
    """How token log-probabilities are computed from the model.

    Attributes:
        fused: Compute from final hidden states and the output weight with
            `align_losses.chunked_linear_logps` (no ``[B, S, V]`` logits); False uses the logits.
        chunk_size: Tokens per chunk in the fused path; None uses `align_losses`' default.
        ignore_index: Label value that marks unscored positions.
        scored_only: Fused path: multiply only the hidden states of scored positions (label not
            ``ignore_index``) by the output weight. Prompts and padding are never scored in
            preference and KTO batches, so this skips their share of the output layer (whose
            ``H × V`` weight is a fifth of a 135M model's matmul work per token): the same values,
            and gradients equal up to float summation order. Finding the positions reads their
            count back to the host once per forward (a synchronisation on CUDA).
        keep_single_chunk: Fused path: when a micro-batch's scored tokens fit in one chunk,
            keep that chunk's exponentiated logits for backward instead of recomputing them
            (`align_losses.chunked_linear_logps`'s ``keep_single_chunk``: one ``N×H×V`` matmul
            fewer, no higher peak when each micro-batch's backward follows its forward, as in
            `align_core.schedule.forward_backward`).
    """

    fused: bool = True
    chunk_size: int | None = None
    ignore_index: int = -100
    scored_only: bool = True
    keep_single_chunk: bool = True


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> Tensor:
    """Megatron's boolean causal mask ``[1, 1, S, S]`` (True = masked, i.e. a future position)."""
    ones = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)[None, None]


def tensor_parallel_group(model: torch.nn.Module) -> torch.distributed.ProcessGroup:
    """The process group the model's vocabulary (and heads) are sharded over."""
    return unwrap_model(model).pg_collection.tp


def vocab_shard_start(vocab_local: int, group: torch.distributed.ProcessGroup | None) -> int:
    """First global vocabulary id of this rank's shard (megatron shards contiguously by rank)."""
    if group is None:
        return 0
    return group.rank() * vocab_local


def _sharded(group: torch.distributed.ProcessGroup | None) -> torch.distributed.ProcessGroup | None:
    # A group of one holds the whole vocabulary: skip the (no-op) collectives.
    return group if group is not None and group.size() > 1 else None


def mask_padded_vocab_(logits: Tensor, *, vocab_size: int, vocab_start: int) -> Tensor:
    """Set the logits of padded vocabulary entries (ids ``>= vocab_size``) to the dtype's minimum.

    In place and autograd-safe (the output layer's backward does not need its output); the
    masked entries get zero gradient. Entries are set to ``finfo.min`` rather than ``-inf`` so a
    shard made only of padding still has a finite maximum.

    Args:
        logits: ``[..., V_local]`` this rank's vocabulary shard.
        vocab_size: Number of real vocabulary entries (the tokenizer's size).
        vocab_start: First global id of this shard.

    Returns:
        ``logits`` itself.
    """
    real = min(max(vocab_size - vocab_start, 0), logits.shape[-1])
    if real < logits.shape[-1]:
        logits.narrow(-1, real, logits.shape[-1] - real).fill_(torch.finfo(logits.dtype).min)
    return logits


def output_weight(model: torch.nn.Module) -> Tensor:
    """This rank's output-layer weight ``[V_padded / TP, H]`` (the embedding when tied)."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    weight = gpt.output_layer.weight
    assert weight is not None  # allocated by the output layer unless tied to the embedding
    return weight


@contextlib.contextmanager
def _post_process_bypassed(gpt: GPTModel) -> Iterator[None]:
    # GPTModel._postprocess returns the decoder output (after the final norm, which belongs to
    # the decoder block) unchanged when `post_process` is False; the flag is read only there.
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


_INPUT_KEYS = ("tokens", "position_ids", "attention_mask", "labels")


def _on_model_device(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The forward's inputs of ``batch`` on the model's device (the rest is not copied)."""
    return to_device({k: batch[k] for k in _INPUT_KEYS if k in batch}, module_device(model))


def _inputs(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    tokens = batch["tokens"]
    seq = tokens.shape[-1]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=tokens.device).expand_as(tokens)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = causal_attention_mask(seq, tokens.device)
    return tokens, position_ids, mask


def final_hidden_states(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run the model and return the final normed hidden states instead of logits.

    Args:
        model: The GPT model of a last pipeline stage (possibly DDP / Float16Module wrapped).
        batch: ``tokens``, optional ``position_ids`` and ``attention_mask`` (see module docs).

    Returns:
        ``[S, B, H]`` hidden states (sequence-parallel shard ``[S / TP, B, H]`` when the model
        uses sequence parallelism).
    """
    tokens, position_ids, mask = _inputs(_on_model_device(model, batch))
    with _post_process_bypassed(unwrap_model(model)):
        return model(tokens, position_ids, mask)


def token_logps_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    group: torch.distributed.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Token log-probs from this rank's vocabulary shard of the logits.

    Args:
        logits: ``[B, S, V_local]`` (modified in place when padded entries are masked).
        labels: ``[B, S]`` global token ids, ``ignore_index`` where not scored.
        group: Tensor-parallel group the vocabulary is sharded over (None: unsharded).
        vocab_size: Real vocabulary size; padded entries beyond it are excluded when given.
        ignore_index: Label value of unscored positions.

    Returns:
        ``[B, S]`` float32 log-probs (0 where ignored).
    """
    from align_losses import token_logps

    group = _sharded(group)
    start = vocab_shard_start(logits.shape[-1], group)
    if vocab_size is not None:
        mask_padded_vocab_(logits, vocab_size=vocab_size, vocab_start=start)
    return token_logps(logits, labels, ignore_index=ignore_index, group=group, vocab_start=start)


def token_logps_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    group: torch.distributed.ProcessGroup | None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    sequence_parallel: bool = False,
    scored_only: bool = False,
    keep_single_chunk: bool = False,
) -> Tensor:
    """Token log-probs from final hidden states and the output weight, without full logits.

    Args:
        hidden: ``[S, B, H]`` final hidden states (``[S / TP, B, H]`` with sequence parallelism).
        weight: ``[V_local, H]`` this rank's output-weight rows.
        labels: ``[B, S]`` global token ids.
        group: Tensor-parallel group (None: unsharded).
        vocab_size: Real vocabulary size; padded rows beyond it are left out when given.
        ignore_index: Label value of unscored positions.
        chunk_size: Tokens per chunk; None uses `align_losses`' default.
        sequence_parallel: Gather the sequence-sharded hidden states over ``group`` first.
        scored_only: Run the output layer only on the positions whose label is not
            ``ignore_index`` (the others get 0 and no gradient either way); reads the number
            of such positions back to the host.
        keep_single_chunk: Passed to `align_losses.chunked_linear_logps`.

    Returns:
        ``[B, S]`` float32 log-probs (0 where ignored).

    Raises:
        ValueError: When this rank's shard holds only padded entries and ``vocab_size`` is given
            (use the logits path, or a smaller ``make_vocab_size_divisible_by``).
    """
    from align_losses import chunked_linear_logps

    group = _sharded(group)
    if sequence_parallel and group is not None:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # chunked_linear_logps already sums the hidden-state gradient over `group`, so the
        # gather's backward must only split (tensor_parallel_output_grad=False), not reduce.
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=group
        )
    start = vocab_shard_start(weight.shape[0], group)
    if vocab_size is not None:
        real = min(max(vocab_size - start, 0), weight.shape[0])
        if real == 0:
            raise ValueError(
                f"this tensor-parallel rank's vocabulary shard [{start}, {start + weight.shape[0]})"
                f" is all padding (vocab_size {vocab_size}); use LogProbConfig(fused=False)"
            )
        weight = weight[:real]
    kwargs: dict[str, Any] = {"keep_single_chunk": keep_single_chunk}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    hidden = hidden.to(weight.dtype)
    labels = labels.t()  # [S, B], the layout of ``hidden``
    # A meta-device forward (shapes only) has no label values to select rows by.
    if scored_only and labels.device.type != "meta":
        flat_labels = labels.reshape(-1)
        rows = (flat_labels != ignore_index).nonzero().squeeze(1)
        if rows.numel() < flat_labels.numel():
            # Every rank of ``group`` holds the same labels, hence the same rows.
            scored = chunked_linear_logps(
                hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows),
                weight,
                flat_labels.index_select(0, rows),
                ignore_index=ignore_index,
                group=group,
                vocab_start=start,
                **kwargs,
            )
            out = scored.new_zeros(flat_labels.shape).index_copy(0, rows, scored)
            return out.view(labels.shape).t()
    out = chunked_linear_logps(
        hidden, weight, labels, ignore_index=ignore_index, group=group, vocab_start=start, **kwargs
    )
    return out.t()


def forward_token_logps(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    *,
    vocab_size: int | None = None,
    config: LogProbConfig = LogProbConfig(),
    group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """One forward pass: label log-probs on the last pipeline stage, activations elsewhere.

    This is the ``forward_fn`` that `align_core.schedule.forward_backward` calls per micro-batch
    (bind ``vocab_size``/``config`` with `functools.partial`).

    Args:
        model: The (possibly wrapped) GPT model chunk of this rank.
        batch: ``tokens``, ``labels``, optional ``position_ids`` and ``attention_mask``.
        vocab_size: Real vocabulary size (padded entries excluded); see the module docstring.
        config: Fused or logits path, chunk size, ignore index.
        group: Tensor-parallel group; default the model's own.

    Returns:
        On the last pipeline stage ``[B, S]`` float32 token log-probs; on other stages the
        stage's output activations ``[S, B, H]`` (which the pipeline schedule sends on).
    """
    gpt = unwrap_model(model)
    batch = _on_model_device(model, batch)
    tokens, position_ids, mask = _inputs(batch)
    if not gpt.post_process:
        return model(tokens, position_ids, mask)
    if group is None:
        group = tensor_parallel_group(gpt)
    labels = batch["labels"]
    if config.fused:
        hidden = final_hidden_states(model, batch)
        return token_logps_from_hidden(
            hidden,
            output_weight(gpt),
            labels,
            group=group,
            vocab_size=vocab_size,
            ignore_index=config.ignore_index,
            chunk_size=config.chunk_size,
            sequence_parallel=gpt.config.sequence_parallel,
            scored_only=config.scored_only,
            keep_single_chunk=config.keep_single_chunk,
        )
    logits = model(tokens, position_ids, mask)
    return token_logps_from_logits(
        logits, labels, group=group, vocab_size=vocab_size, ignore_index=config.ignore_index
    )
