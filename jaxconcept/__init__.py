"""jaxconcept: learning dynamics of generative models in concept space, in JAX.

Packages by purpose (docs/layout.md): ``config``, ``data``, ``nets``, ``vdm`` (the diffusion
model), ``train`` (the engine), ``analysis`` (probes, measures, figures), ``elicit`` (hidden
capabilities), ``sd`` (Stable Diffusion), ``rundir`` and ``runs`` (run directories).
"""
import importlib
import warnings

__version__ = "0.1.0"

# Modules that moved into packages (release 0.1.0 -> the package layout): the old names still
# import, with a DeprecationWarning naming the new place.
MOVED = {
    **{m: f"jaxconcept.train.{m}" for m in ("step", "stack", "programs", "plan", "loop", "checkpoint", "runconfig")},
    **{m: f"jaxconcept.analysis.{m}" for m in ("probe", "probe_net", "dynamics", "analyze", "plots", "claims",
                                                "stats")},
    "diffusion": "jaxconcept.vdm", "groups": "jaxconcept.runs", "interventions": "jaxconcept.elicit.edits",
    "prompts": "jaxconcept.elicit.prompts", "elicit_plots": "jaxconcept.elicit.plots",
}


def __getattr__(name: str):
    """``from jaxconcept import loop`` and the like: the moved module, with a DeprecationWarning.
    Raises AttributeError for any other unknown name."""
    if name in MOVED:
        warnings.warn(f"jaxconcept.{name} is now {MOVED[name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[name])
    raise AttributeError(f"module 'jaxconcept' has no attribute {name!r}")
