"""Stable Diffusion 1.x inference in Flax linen, with tap points for interventions.

A port of the three networks SD-1.x samples with (CLIP text encoder, conditional UNet, VAE
decoder), weights read from a local folder in the diffusers layout, a DDIM sampler with
classifier-free guidance, and overprompting as pure functions of the text conditioning.

    from jaxconcept.sd import weights, pipeline
    model, params, tok = weights.load("path/to/stable-diffusion-v1-4")
    images = pipeline.generate(model, params, cond, null, noise, n_steps=50, guidance=7.5)

Modules: ``configs`` (the networks' sizes, read from each component's config.json), ``blocks``,
``clip``, ``unet``, ``vae`` (the networks), ``weights`` (safetensors -> our parameter tree),
``tokenizer``, ``pipeline`` (schedule, DDIM, guidance, decoding), ``overprompt`` (the
conditioning transforms), ``command`` (``jaxconcept sd``). Needs the optional extra
``jaxconcept[sd]`` (safetensors, tokenizers) only to read weights and tokenize.
"""


class SDError(Exception):
    """A bad input to the Stable Diffusion port (folder, layout, prompt, settings): one line."""
