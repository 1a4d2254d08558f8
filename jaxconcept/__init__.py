"""jaxconcept: learning dynamics of generative models in concept space, in JAX."""
__version__ = "0.1.0"
