"""Typed sampling and length settings of text generation (NeMo-Aligner's names and defaults).

`SamplingConfig` mirrors NeMo's ``sampling_params`` and `LengthConfig` its ``length_params``, so a
NeMo-Aligner SPIN config maps field for field. Every default lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LengthConfig", "SamplingConfig"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the model's logits.

    The processing order is: padded-vocabulary entries removed, repetition penalty, end-of-sequence
    blocked until ``LengthConfig.min_length``, then (when sampling) temperature, top-k and top-p.

    Attributes:
        use_greedy: Take the most likely token (temperature, top_k and top_p are then ignored).
        temperature: Divides the logits before sampling; must be > 0.
        top_k: Keep only the ``top_k`` most likely tokens; 0 keeps all.
        top_p: Keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling); 1.0 keeps all.
        repetition_penalty: CTRL's penalty on tokens already in the prompt or response (a logit
            ``z`` becomes ``z / penalty`` if positive, ``z * penalty`` otherwise); 1.0 is off.
        end_strings: Generation of a sample stops once its decoded response contains one of these
            strings (the tokens up to and including the one that completes it are kept).
    """

    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    end_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.end_strings, str):
            raise TypeError("end_strings must be a sequence of strings, not one string")
        object.__setattr__(self, "end_strings", tuple(self.end_strings))
        if any(not s for s in self.end_strings):
            raise ValueError("end_strings must not contain the empty string")


@dataclass(frozen=True)
class LengthConfig:
    """How many tokens each sample may generate (prompt tokens excluded).

    Attributes:
        max_length: Most new tokens per sample. The effective limit is also capped so that prompt
            plus response fits the model's ``max_sequence_length`` (NeMo's rule).
        min_length: Fewest new tokens per sample before an end-of-sequence token or an end string
            may stop it.
    """

    max_length: int = 256
    min_length: int = 0

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(
                f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}"
            )
