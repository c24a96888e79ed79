"""The device boundary: batches built on the host reach the model's device.

CPU machines have one other device, ``meta``: a model whose parameters live there stands in for
a GPU model (collate still builds CPU batches), and its forward asserts that every input is on
its parameters' device. The production `Trainer` then runs a real algorithm step, data source and
reference policy against it; meta tensors hold no values, so each step is stopped right after
its first loss, once the devices it saw are recorded.
"""

import collections
import dataclasses

import pytest
import torch
from _core_scripts import load_tiny

from align_core import build_gpt_model
from align_core.algorithms import DPOConfig, KTOConfig, SFTConfig
from align_core.algorithms.dpo import DPOStep
from align_core.algorithms.kto import KTOStep
from align_core.algorithms.sft import SFTStep
from align_core.algorithms.spin import SPINConfig, SPINStep
from align_core.reference import PrecomputedReference, reference_forward
from align_core.trainer import TrainerConfig
from align_core.trainer.loop import ParallelGroups, Trainer
from align_data import ArrayStore

T = load_tiny()

META = torch.device("meta")
# megatron's rotary embedding keeps its frequencies in a plain attribute that `.to()` leaves on
# the CPU; learned positions make the whole forward a meta computation.
META_MODEL = T.MODEL.replace(position_embedding_type="learned_absolute")


class _StopError(Exception):
    """Raised by the recording loss once the first micro-batch's devices are recorded."""


class DeviceCheckedModel(torch.nn.Module):
    """A model (wrapper) whose forward refuses inputs that are not on its parameters' device."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.module = gpt
        self.forwards = 0

    def forward(self, *args, **kwargs):
        device = next(self.module.parameters()).device
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                shape = tuple(value.shape)
                assert value.device == device, (
                    f"forward input {shape} is on {value.device}, the model on {device}"
                )
        self.forwards += 1
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:  # megatron DDP's, called by the trainer
        pass


class NoOptimizer:
    """The optimizer calls the trainer makes before its first loss."""

    param_groups: list = []  # noqa: RUF012

    def zero_grad(self) -> None:
        pass


class Recording:
    """A real algorithm step that records the device of every tensor its normaliser and its loss
    are handed (and of the normaliser it returns), then stops the step after the first loss."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.needs_reference, self.ref_shape = inner.name, inner.needs_reference, 2
        self.devices: dict[str, set[torch.device]] = collections.defaultdict(set)

    def _record(self, where: str, batch) -> None:
        for key, value in batch.items():
            self.devices[f"{where}:{key}"].add(value.device)

    def build_micro_batch(self, examples, collate):
        return self.inner.build_micro_batch(examples, collate)

    def normalizer(self, micro_batches, global_examples):
        for mb in micro_batches:
            self._record("normalizer", mb)
        out = self.inner.normalizer(micro_batches, global_examples)
        self.devices["normalizer"].add(out.device)
        return out

    def loss_fn(self, normalizer):
        loss_fn = self.inner.loss_fn(normalizer)

        def loss(batch, token_logps):
            self._record("loss", batch)
            self.devices["token_logps"].add(token_logps.device)
            value, metrics = loss_fn(batch, token_logps)  # the real loss, on those devices
            self.devices["loss"].add(value.device)
            for key, metric in metrics.items():
                self.devices[f"metric:{key}"].add(metric.device)
            raise _StopError

        return loss

    def finalize_metrics(self, sums):
        return self.inner.finalize_metrics(sums)


def _cached_reference(tmp_path, rows: int) -> PrecomputedReference:
    """The precompute strategy's reader over a filled cache (host tensors, as on a GPU run)."""
    store = ArrayStore.open(tmp_path / "ref", key="device-test", num_samples=rows, shape=(2,))
    store.write(torch.arange(rows), torch.full((rows, 2), -3.0))
    return PrecomputedReference({"train": store, "val": store}, "device-test")


def _algorithm(name: str):
    if name == "dpo":
        return DPOStep(DPOConfig(sft_loss_weight=0.1)), T.preference_examples(8)
    if name == "kto":
        return KTOStep(KTOConfig()), T.unpaired_examples(4)
    if name == "sft":
        return SFTStep(SFTConfig()), T.sft_examples(8)
    return SPINStep(SPINConfig()), T.preference_examples(8)


def _meta_trainer(tmp_path, name: str):
    step, examples = _algorithm(name)
    recording = Recording(step)
    model = DeviceCheckedModel(build_gpt_model(META_MODEL, device=META))
    trainer = Trainer(
        config=TrainerConfig(max_steps=1, val_check_interval=1, save_interval=0),
        algorithm=recording,
        model=model,
        optimizer=NoOptimizer(),
        data=T.data(examples, examples, recording, mbs=2, gbs=4),
        forward_fn=T.FORWARD,
        learning_rate=lambda s: 1e-3,
        groups=ParallelGroups.from_megatron(torch.device("cpu")),
        reference=_cached_reference(tmp_path, len(examples)) if step.needs_reference else None,
    )
    return trainer, recording, model


@pytest.mark.parametrize("algorithm", ["dpo", "kto", "sft", "spin"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_trainer_moves_every_batch_tensor_to_the_model_device(dist_ctx, tmp_path, algorithm, split):
    trainer, recording, model = _meta_trainer(tmp_path, algorithm)
    with pytest.raises(_StopError):
        trainer.train_step() if split == "train" else trainer.validate()
    assert model.forwards == 1
    wrong = {k: v for k, v in recording.devices.items() if v != {META}}
    assert not wrong, f"not on the model's device: {wrong}"
    # The loss saw the whole micro-batch, reference log-probs included.
    keys = {k.split(":", 1)[1] for k in recording.devices if k.startswith("loss:")}
    assert {"tokens", "labels", "segment_ids", "seq_token_counts"} <= keys
    assert trainer.algorithm.needs_reference == ("ref_logps" in keys)


def test_reference_forward_moves_host_batches(dist_ctx):
    """The precompute pass (and every reference strategy) hands host batches to the forward."""
    model = DeviceCheckedModel(build_gpt_model(META_MODEL, device=META))
    step = DPOStep(DPOConfig())
    batches = T.data(T.preference_examples(4), [], step, mbs=2, gbs=4).train_micro_batches(0)
    assert batches[0]["tokens"].device.type == "cpu"
    logps = reference_forward(model, batches, T.FORWARD)
    assert [lp.device for lp in logps] == [META, META] and model.forwards == 2
    assert batches[0]["tokens"].device.type == "cpu"  # the caller's batches are not modified


# ------------------------------------------------------------------------------ to_device


@dataclasses.dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor
    lengths: list
    name: str = "x"


class _Pair(collections.namedtuple("_Pair", "a b")):
    pass


def test_to_device_walks_containers_and_leaves_the_input_alone():
    from align_core.device import to_device

    t = torch.arange(6).reshape(2, 3)
    batch = {
        "tokens": t,
        "nested": [t, (t, 3)],
        "pair": _Pair(t, "s"),
        "record": _Batch(t, [t, None]),
        "none": None,
    }
    moved = to_device(batch, "meta")
    assert moved["tokens"].device == META and moved["tokens"].shape == (2, 3)
    assert [x.device for x in (moved["nested"][0], moved["nested"][1][0])] == [META, META]
    assert moved["nested"][1][1] == 3 and isinstance(moved["nested"][1], tuple)
    assert isinstance(moved["pair"], _Pair) and moved["pair"].a.device == META
    assert moved["pair"].b == "s"
    assert isinstance(moved["record"], _Batch) and moved["record"].ids.device == META
    assert moved["record"].lengths[0].device == META and moved["record"].name == "x"
    assert moved["none"] is None
    assert batch["tokens"] is t and batch["record"].ids is t  # input untouched


def test_to_device_does_not_copy_what_is_already_there():
    from align_core.device import to_device

    t = torch.ones(3)
    batch = {"a": t}
    assert to_device(batch, "cpu")["a"] is t
    assert to_device(t, torch.device("cpu")) is t


def test_module_device_sees_through_wrappers(dist_ctx):
    from align_core import module_device
    from align_core.training import wrap_ddp

    assert module_device(DeviceCheckedModel(build_gpt_model(META_MODEL, device=META))) == META
    assert module_device(wrap_ddp(T.fresh_model())).type == "cpu"
    assert module_device(torch.nn.Identity()) == torch.device("cpu")
