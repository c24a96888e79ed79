"""Check a `.nemo`'s config against the shapes of its stored weights, before building anything.

A ``model_config.yaml`` that lies about sizes (``num_layers: 1000000000``, ``hidden_size:
10000000``) would otherwise make megatron allocate (or hang building) a model the weights cannot
fill. `stored_shapes` reads only shapes: the distributed checkpoint's metadata, or the pickles of
legacy shard files (memory-mapped, tensor data untouched), merged to full shapes.
`check_weight_shapes` compares them with the `ModelConfig` and names the key and both values.
"""

from __future__ import annotations

from align_core.config import ModelConfig
from align_core.nemo.errors import NemoFormatError
from align_core.nemo.shards import is_extra_state, layer_index, partition_of
from align_core.nemo.weights import (
    WeightsLayout,
    read_checkpoint_file,
    stored_tensors,
    strip_prefix,
)

__all__ = ["check_weight_shapes", "stored_shapes"]

_STACKED = "decoder.layers."


def _legacy_shapes(layout: WeightsLayout, origin: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    offset = 0
    for row in layout.files:
        stage: dict[str, tuple[int, ...]] = {}
        for path in row:
            state = strip_prefix(read_checkpoint_file(path, origin=origin), origin=origin)
            for key, value in state.items():
                shape = tuple(getattr(value, "shape", ()))
                dim = partition_of(key, gated=False).dim
                if key in stage and dim is not None and len(shape) > dim:
                    summed = list(stage[key])
                    summed[dim] += shape[dim]
                    shape = tuple(summed)
                stage[key] = shape
        indices = {i for i in map(layer_index, stage) if i is not None}
        for key, shape in stage.items():
            index = layer_index(key)
            if index is not None:
                key = key.replace(f"layers.{index}.", f"layers.{index + offset}.", 1)
            out.setdefault(key, shape)
        offset += len(indices)
    return out


def stored_shapes(layout: WeightsLayout, *, origin: str = "<nemo>") -> dict[str, tuple[int, ...]]:
    """Full (unsplit) shapes of the stored weights, unprefixed keys, global layer numbers.

    Raises:
        NemoFormatError: When a file cannot be read.
    """
    if layout.kind == "distributed":
        shapes = strip_prefix(stored_tensors(layout.files[0][0], origin=origin), origin=origin)
        return _unstack_layers(shapes)  # type: ignore[arg-type]
    return _legacy_shapes(layout, origin)


def _unstack_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes from megatron's stacked layers.

    Distributed checkpoints store ``decoder.layers.X`` of shape ``[num_layers, ...]``; it becomes
    ``decoder.layers.N.X`` of shape ``[...]`` for each layer.
    """
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key.startswith(_STACKED) and layer_index(key) is None and shape:
            rest = key[len(_STACKED) :]
            out.update({f"{_STACKED}{i}.{rest}": shape[1:] for i in range(shape[0])})
        else:
            out[key] = shape
    return out


def check_weight_shapes(
    model: ModelConfig, shapes: dict[str, tuple[int, ...]], *, origin: str = "<nemo>"
) -> None:
    """Check the architecture against the stored shapes (layers, width, heads, MLP).

    Only what the weights hold is checked (a pipeline stage's file without an embedding checks
    the rest).

    Raises:
        NemoFormatError: Naming the config key, its value and the stored size.
    """
    shapes = {k: v for k, v in shapes.items() if not is_extra_state(k)}
    says = f"{origin}: model_config.yaml says"
    layers = {i for i in map(layer_index, shapes) if i is not None}
    if layers and len(layers) != model.num_layers:
        raise NemoFormatError(
            f"{says} num_layers={model.num_layers}, but the weights hold {len(layers)} layers"
        )
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    groups = model.num_query_groups or model.num_attention_heads
    qkv_rows = (model.num_attention_heads + 2 * groups) * head_dim
    expected = {  # key suffix -> (dim, value, what the config says)
        "word_embeddings.weight": (1, model.hidden_size, f"hidden_size={model.hidden_size}"),
        "final_layernorm.weight": (0, model.hidden_size, f"hidden_size={model.hidden_size}"),
        "linear_proj.weight": (0, model.hidden_size, f"hidden_size={model.hidden_size}"),
        "linear_fc2.weight": (1, model.ffn_hidden_size, f"ffn_hidden_size={model.ffn_hidden_size}"),
        "linear_qkv.weight": (
            0,
            qkv_rows,
            f"num_attention_heads={model.num_attention_heads}, num_query_groups={groups}, "
            f"kv_channels={head_dim} ({qkv_rows} q/k/v rows)",
        ),
    }
    for key, shape in shapes.items():
        for suffix, (dim, value, claim) in expected.items():
            if key.endswith(suffix) and len(shape) > dim and shape[dim] != value:
                raise NemoFormatError(
                    f"{says} {claim}, but the stored {key} has shape {list(shape)}"
                )
