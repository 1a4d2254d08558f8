"""Configs: frozen dataclasses with declared constraints, sweep axes, presets, files, ``--set``.

A ``Config`` holds four sections (``data``: ``ImageData``, ``VectorData`` or ``CelebaData`` by
``data.kind``; ``model``; ``train``; ``eval``), member 0's ``seed``, a ``name``, and ``sweep``:
the axes of a sweep, e.g. ``(("data.sep_col", (0.2, 0.4)), ("seeds", (0, 100)))``, whose product
``members(cfg)`` expands into one scalar config per member; ``zipped`` and ``sampled`` axes too
(``sweeps``), and ``groups(cfg)`` splits members whose programs differ. Files and ``--set`` write
an axis as a list in its field (``data.sep_col=[0.2,0.4]``, ``seeds=[0,100]``) or a sampled one
as ``{"log_uniform": [1e-4, 1e-2]}``, with ``sweep.n`` draws.

Every error is a ``ConfigError``: one line naming the dotted field and what is allowed.

Modules: ``checks`` (field types and the checker), ``sections`` (the classes, members),
``sweeps`` (which fields may be axes, grid/zipped/sampled axes, groups), ``rules`` (the
cross-field rules), ``presets``, ``files`` (dicts, files, overrides).
"""
from jaxconcept.config.checks import ConfigError, field_names
from jaxconcept.config.files import SECTIONS, from_dict, load, override, parse_value, resolve, save, to_dict
from jaxconcept.config.presets import PRESETS, preset
from jaxconcept.config.rules import MAX_CLASSES, MAX_MEMBER_BYTES, validate
from jaxconcept.config.sections import (DATA_KINDS, IMAGE_CONCEPTS, SWEEP_AXES, SWEEP_FIELDS, CelebaData, Config,
                                        DataConfig, EvalConfig, ImageData, ModelConfig, TrainConfig, VectorData,
                                        data_config, eval_steps, members, sweep_settings, sweep_values, swept_fields)
from jaxconcept.config.sweeps import (HYPER_FIELDS, PER_MEMBER, REFUSED, group_fields, groups, member_values,
                                      program_key)

__all__ = ["DATA_KINDS", "HYPER_FIELDS", "PER_MEMBER", "REFUSED", "group_fields", "groups", "member_values",
           "program_key", "IMAGE_CONCEPTS", "MAX_CLASSES", "MAX_MEMBER_BYTES", "PRESETS", "SECTIONS", "SWEEP_AXES",
           "SWEEP_FIELDS", "CelebaData", "Config", "ConfigError", "DataConfig", "EvalConfig", "ImageData",
           "ModelConfig", "TrainConfig", "VectorData", "data_config", "eval_steps", "field_names", "from_dict",
           "load", "members", "override", "parse_value", "preset", "resolve", "save", "sweep_settings",
           "sweep_values", "swept_fields", "to_dict", "validate"]
