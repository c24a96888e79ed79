"""SFT: negative log-likelihood of the response tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SFTConfig"]


@dataclass
class SFTConfig:
    """``model.sft``: how the supervised loss is reduced.

    Attributes:
        loss_reduction: ``token_mean`` divides the summed token NLL of the global batch by the
            number of response tokens in the global batch (every token weighs the same);
            ``sequence_mean`` averages each sequence's mean token NLL over the global batch
            (every example weighs the same).
    """

    loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean"
