"""Compatibility names for code written against the former one-module engine (``sweep.train``,
``sweep.build``...): the engine is now ``step`` (one member) -> ``stack`` (the model axis) ->
``plan`` (the "auto" stacking) -> ``loop`` (``train``). New code imports those modules; this one
only re-exports their public names under the old ones and defines nothing.
"""
from jaxconcept.loop import RunError, check_processes_agree, train
from jaxconcept.plan import HEADROOM, build, host_available_memory, memory_budget, step_memory
from jaxconcept.stack import (AXIS, Sweep, advance, evaluate, host, init, make_mesh, seeds_array, stacked_data_params,
                              steps_per_call, train_keys)
from jaxconcept.stack import load_params as load_state_params
from jaxconcept.step import draw_batch, eval_loss, eval_params, init_member, member_keys, optimizer, train_step

__all__ = ["AXIS", "HEADROOM", "RunError", "Sweep", "advance", "build", "check_processes_agree", "draw_batch",
           "eval_loss", "eval_params", "evaluate", "host", "host_available_memory", "init", "init_member",
           "load_state_params", "make_mesh", "member_keys", "memory_budget", "optimizer", "seeds_array",
           "stacked_data_params", "step_memory", "steps_per_call", "train", "train_keys", "train_step"]
