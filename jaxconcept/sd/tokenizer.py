"""CLIP's tokenizer through the ``tokenizers`` library (from ``vocab.json`` + ``merges.txt``), and
where a concept's tokens sit in a prompt.

The pipeline is CLIP's (Radford et al. 2021; as transformers configures its fast CLIP
tokenizer): NFC, runs of whitespace to one space, lower case; split into CLIP's word pieces
(contractions, letter runs, single digits, runs of other symbols); byte-level alphabet; BPE with
``</w>`` marking a word's end. A prompt becomes [bos, tokens..., eos, pad...], ``length`` ids
(77 for SD-1.x), padded with ``special_tokens_map.json``'s pad token (SD-1.4: the eos token).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxconcept.sd import SDError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_PIECES = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _special(folder: Path, key: str, default: str) -> str:
    """A special token's text from special_tokens_map.json (a string or {"content": ...})."""
    path = folder / "special_tokens_map.json"
    if not path.exists():
        return default
    try:
        value = json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError) as exc:
        raise SDError(f"{path}: cannot be read as JSON ({exc})") from None
    return value.get("content", default) if isinstance(value, dict) else value


def word_pattern(word: str):
    """A regex finding ``word`` as whole words (not inside another word), any case."""
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Tokenizer:
    """CLIP tokenization to fixed-length id arrays. Build with ``from_folder``."""

    bpe: object  # tokenizers.Tokenizer
    bos: int
    eos: int
    pad: int
    length: int

    @classmethod
    def from_folder(cls, folder, length: int) -> "Tokenizer":
        """The tokenizer of ``folder`` (vocab.json, merges.txt); SDError when they are missing."""
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers

        folder = Path(folder)
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise SDError(f"{f} is missing (the tokenizer folder needs vocab.json and merges.txt)")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges), end_of_word_suffix="</w>", unk_token=EOS,
                                       continuing_subword_prefix="", fuse_unk=False)
            table = json.loads(vocab.read_text())
        except Exception as exc:  # noqa: BLE001 - the library's own errors name the problem
            raise SDError(f"{folder}: vocab.json / merges.txt cannot be read ({exc})") from None
        tok = HFTokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PIECES), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = {}
        for key, default in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", EOS)):
            text = _special(folder, key, default)
            if text not in table:
                raise SDError(f"{folder}: the {key} {text!r} is not in vocab.json")
            specials[key] = table[text]
        return cls(tok, specials["bos_token"], specials["eos_token"], specials["pad_token"], length)

    def tokens(self, text: str) -> list[int]:
        """The ids of ``text`` without specials or padding."""
        return list(self.bpe.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> np.ndarray:
        """[length] int32: bos, the tokens, eos, padding. SDError when the text is too long."""
        ids = self.tokens(text)
        if len(ids) > self.length - 2:
            raise SDError(f"the prompt {text!r} has {len(ids)} tokens; SD-1.x reads at most {self.length - 2}")
        out = [self.bos, *ids, self.eos]
        return np.array(out + [self.pad] * (self.length - len(out)), np.int32)

    def concept_mask(self, prompt: str, concept: str) -> np.ndarray:
        """[length] float32: 1 at the tokens of every occurrence of ``concept`` in ``prompt``
        (as whole words), else 0. SDError when the concept is not in the prompt."""
        if not concept.strip() or not word_pattern(concept).search(prompt):
            raise SDError(f"the concept {concept!r} is not a word of the prompt {prompt!r}")
        ids, word = list(self.encode(prompt)), self.tokens(concept)
        mask = np.zeros(self.length, np.float32)
        for i in range(len(ids) - len(word) + 1):
            if ids[i:i + len(word)] == word:
                mask[i:i + len(word)] = 1.0
        if not mask.any():
            raise SDError(f"the concept {concept!r} does not tokenize the same inside the prompt {prompt!r}")
        return mask
