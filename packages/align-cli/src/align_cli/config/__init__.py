"""The ``align run`` configuration: a Hydra-composed tree of align-core's typed dataclasses."""

from align_cli.config.compose import Composed, compose, load_tree, parse_overrides, to_yaml
from align_cli.config.schema import normalize_data_prefix, to_run_config, tree_class

__all__ = [
    "Composed",
    "compose",
    "load_tree",
    "normalize_data_prefix",
    "parse_overrides",
    "to_run_config",
    "to_yaml",
    "tree_class",
]
