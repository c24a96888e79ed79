"""The reference policy π_ref of DPO-family and KTO training: one protocol, four strategies.

Every strategy answers the same question: the reference's per-sequence *summed* log-probs of
the sequences in a list of model batches (see `align_core.algorithms._common`), on the last
pipeline stage. They differ in where the reference weights live:

============  ====================================================================  =============
strategy      how                                                                   use it for
============  ====================================================================  =============
swap          reference weights in (pinned, with CUDA) CPU memory; around each      full fine-
              reference pass the live policy weights are copied out once into a     tuning,
              preallocated buffer, the reference weights in once, and the policy    memory-bound
              weights back once, with non-blocking copies, under try/finally
adapters      the policy with its LoRA adapters disabled                            LoRA
precompute    one forward pass over the data before training; log-probs cached     offline DPO/
              on disk (align-data's fingerprinted array store, keyed by the         KTO: zero
              reference weights and the data) and read per step                     cost per step
model         a second, frozen copy of the model in device memory                   memory to
                                                                                    spare
============  ====================================================================  =============

Where the reference must follow the policy (SPIN's opponent is the policy at the start of each
iteration; TR-DPO moves the reference towards the policy), ``swap`` and ``model`` are
`RefreshableReference` strategies: ``refresh(alpha)`` sets
reference ← α·policy + (1 − α)·reference (``alpha=1``: an exact copy; soft updates in float32,
rounded once to the stored dtype), ``weights()`` yields a module holding the reference weights,
and ``checkpoint_state()`` is the reference as a checkpoint extra model, so a refreshed
reference survives a resume. ``adapters`` and ``precompute`` cannot follow the policy; their
``refresh`` raises.

`resolve_strategy` implements ``ReferenceConfig.strategy="auto"``: ``adapters`` with LoRA,
otherwise ``precompute``. An explicitly requested strategy that cannot apply raises; nothing ever
falls back silently to another strategy.

All online strategies (swap, adapters, model) run the reference forward through the same
micro-batches and code path as the policy forward, so at step 0 policy and reference log-probs
are bitwise equal and the DPO loss is exactly ln 2. ``precompute`` runs its pass over the same
micro-batches the first epoch will use, with the same result.
"""

from align_core.reference.base import (
    ReferencePolicy,
    RefreshableReference,
    Strategy,
    check_alpha,
    model_fingerprint,
    named_parameters,
    reference_forward,
    resolve_strategy,
    tensors_fingerprint,
)
from align_core.reference.online import (
    AdapterReference,
    ModelReference,
    SwapReference,
    TrainOnlyReference,
    refreshable_reference,
)
from align_core.reference.precompute import PrecomputedReference, precompute_reference

__all__ = [
    "AdapterReference",
    "ModelReference",
    "PrecomputedReference",
    "ReferencePolicy",
    "RefreshableReference",
    "Strategy",
    "SwapReference",
    "TrainOnlyReference",
    "check_alpha",
    "model_fingerprint",
    "named_parameters",
    "precompute_reference",
    "reference_forward",
    "refreshable_reference",
    "resolve_strategy",
    "tensors_fingerprint",
]
