"""Overprompting Stable Diffusion: the text conditioning pushed along a concept word.

Every method maps strengths s [S] (a traced array: one jitted call covers them all) to one text
conditioning per strength [S, T, D]; s = 0 is the prompt as written (naive prompting):

  extrapolate  c + s (c - c_ref), c_ref the prompt with the concept word replaced by a reference
               word of as many tokens (the toy model's overprompting, ``prompts.extrapolate``)
  weight       the concept's positions of the encoder output scaled by 1 + s
  token        the concept's input token embeddings scaled by 1 + s, then encoded
  repeat       the concept word written 1 + s times (s a whole number)
  steer        s (h - h_ref) added at a text-encoder tap point (``Edit`` "add"; h, h_ref the
               activations of the prompt and the reference prompt there): latent steering
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxconcept.elicit.edits import Edit
from jaxconcept.elicit.prompts import extrapolate
from jaxconcept.sd import SDError
from jaxconcept.sd.pipeline import StableDiffusion, capture, encode, tap_names
from jaxconcept.sd.tokenizer import Tokenizer, quote, word_pattern

METHODS = ("extrapolate", "weight", "token", "repeat", "steer")
NEEDS_REF = ("extrapolate", "steer")


def weight(c, mask, s):
    """c with the positions where mask [T] is 1 scaled by 1 + s: c [T, D], s [S] -> [S, T, D]."""
    return c[None] * (1 + s[:, None, None] * mask[None, :, None])


def token_scale(mask, s):
    """Per-position token-embedding scales 1 + s mask: mask [T], s [S] -> [S, T]."""
    return 1 + s[:, None] * mask[None, :]


def steering_edits(point: str, direction, s) -> list[Edit]:
    """``Edit``s adding s direction at ``point`` (direction [T, D], one strength per row, s [S])."""
    return [Edit(point, "add", value=direction, strength=s[:, None, None])]


def repeat_prompt(prompt: str, concept: str, k: int) -> str:
    """``prompt`` with each occurrence of ``concept`` written ``k`` + 1 times."""
    return word_pattern(concept).sub(lambda m: " ".join([m.group(0)] * (k + 1)), prompt)


@dataclass(frozen=True)
class Plan:
    """A checked request: token ids and masks the methods need (host arrays, [T] each)."""

    method: str
    strengths: np.ndarray  # [S] float32
    ids: np.ndarray  # [T] the prompt
    mask: np.ndarray  # [T] 1 at the concept's tokens
    ref_ids: np.ndarray | None = None  # [T] the reference prompt (extrapolate, steer)
    repeat_ids: np.ndarray | None = None  # [S, T] the prompts with the word repeated (repeat)


def plan(tok: Tokenizer, prompt: str, concept: str, method: str, strengths, ref: str | None = None) -> Plan:
    """Tokenize and check a request before anything is computed.

    Raises:
      SDError: unknown method; the concept is not a word of the prompt; a reference missing
        (extrapolate, steer) or not of the concept's token count; strengths not finite, or
        (repeat) not whole numbers >= 0, or a repeated prompt too long.
    """
    if method not in METHODS:
        raise SDError(f"--method {method!r} is unknown: allowed {', '.join(METHODS)}")
    s = np.asarray(strengths, np.float64)
    if s.ndim != 1 or not len(s) or not np.isfinite(s).all():
        raise SDError(f"strengths {list(strengths)}: allowed a non-empty list of finite numbers")
    mask = tok.concept_mask(prompt, concept)
    out = dict(method=method, strengths=s.astype(np.float32), ids=tok.encode(prompt), mask=mask)
    if method in NEEDS_REF:
        if not ref or not ref.strip():
            raise SDError(f"--method {method} needs --ref WORD: a word of as many tokens as {concept!r}")
        ref_prompt = word_pattern(concept).sub(lambda m: ref.strip(), prompt)
        n, n_ref = len(tok.tokens(prompt)), len(tok.tokens(ref_prompt))
        if n != n_ref:
            raise SDError(f"the reference {quote(ref)} is misaligned: {quote(ref_prompt)} has {n_ref} tokens, "
                          f"the prompt {n} ({quote(concept)} is {len(tok.tokens(concept))} token(s), "
                          f"{quote(ref)} {len(tok.tokens(ref))})")
        out["ref_ids"] = tok.encode(ref_prompt)
    if method == "repeat":
        if (s < 0).any() or (s != np.round(s)).any():
            raise SDError(f"--method repeat takes whole-number strengths >= 0 (repeats), got {list(strengths)}")
        out["repeat_ids"] = np.stack([tok.encode(repeat_prompt(prompt, concept, int(k))) for k in s])
    return Plan(**out)


def default_point(model: StableDiffusion) -> str:
    """The steering point by default: the output of the text encoder's middle layer."""
    return f"text_encoder/encoder/layers_{max(model.cfg.clip.num_hidden_layers // 2 - 1, 0)}/out"


def steer_points(model: StableDiffusion) -> list[str]:
    """Text-encoder tap points a ``steer`` may use (those with a [T, D] activation per prompt)."""
    return [p for p in tap_names(model) if p.startswith("text_encoder/")]


def conditioning(model, params, p: Plan, point: str | None = None):
    """The text conditioning [S, T, D] of every strength of plan ``p`` (float32).

    ``point`` (steer only; default ``default_point``) must be one of ``steer_points``.
    """
    s = jnp.asarray(p.strengths)
    k = len(p.strengths)
    if p.method == "repeat":
        return encode(model, params, jnp.asarray(p.repeat_ids))
    ids = jnp.asarray(p.ids)[None]  # [1, T]
    if p.method == "token":
        return encode(model, params, jnp.broadcast_to(ids, (k, ids.shape[1])), token_scale(jnp.asarray(p.mask), s))
    if p.method == "steer":
        point = point or default_point(model)
        if point not in steer_points(model):
            raise SDError(f"--point {point!r} is not a text-encoder tap point: allowed {', '.join(steer_points(model))}")
        acts = capture(model, params, np.stack([p.ids, p.ref_ids]), [point])[point]  # [2, T, D]
        edits = steering_edits(point, acts[0] - acts[1], s)
        return encode(model, params, jnp.broadcast_to(ids, (k, ids.shape[1])), None, edits)
    c = encode(model, params, ids)[0]  # [T, D]
    if p.method == "weight":
        return weight(c, jnp.asarray(p.mask), s)
    return extrapolate(c, encode(model, params, jnp.asarray(p.ref_ids)[None])[0], s)


def null_conditioning(model, params, tok: Tokenizer):
    """The empty prompt's conditioning [T, D] (classifier-free guidance's unconditional input)."""
    return encode(model, params, jnp.asarray(tok.encode(""))[None])[0]
