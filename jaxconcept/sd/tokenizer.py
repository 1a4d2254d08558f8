"""CLIP's tokenizer through the ``tokenizers`` library (from ``tokenizer.json``, or ``vocab.json`` +
``merges.txt``), and where a concept's tokens sit in a prompt.

A folder saved by current transformers holds ``tokenizer.json``, the whole pipeline as the
``tokenizers`` library writes it; it is read as it is. Older folders (SD-1.4's) hold only
``vocab.json`` and ``merges.txt``; the pipeline is then built as CLIP's (Radford et al. 2021; as
transformers configures its fast CLIP tokenizer): NFC, runs of whitespace to one space, lower
case; split into CLIP's word pieces (contractions, letter runs, single digits, runs of other
symbols); byte-level alphabet; BPE with ``</w>`` marking a word's end. A prompt becomes [bos,
tokens..., eos, pad...], ``length`` ids (77 for SD-1.x). The special tokens are read as
transformers reads them: ``special_tokens_map.json`` first, then ``tokenizer_config.json``, else
CLIP's (the pad token defaults to the eos token, as in SD-1.4; SD-2 pads with "!").
"""
from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxconcept.sd import SDError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_PIECES = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIALS = (("bos_token", BOS), ("eos_token", EOS), ("pad_token", EOS))


def quote(text: str, limit: int = 60) -> str:
    """``text`` quoted for a one-line message, its middle elided past ``limit`` characters."""
    short = reprlib.Repr()
    short.maxstring = limit
    return short.repr(text)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SDError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SDError(f"{path}: not a JSON object")
    return value


def special_tokens(folder) -> dict:
    """{"bos_token", "eos_token", "pad_token": text} from the folder's ``special_tokens_map.json``,
    else its ``tokenizer_config.json``, else CLIP's (a value may be a string or {"content": ...})."""
    folder = Path(folder)
    sources = [_read_json(folder / f) for f in ("special_tokens_map.json", "tokenizer_config.json")
               if (folder / f).is_file()]
    out = {}
    for key, default in _SPECIALS:
        value = next((src[key] for src in sources if src.get(key) is not None), default)
        out[key] = value.get("content", default) if isinstance(value, dict) else value
    return out


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
        """The tokenizer of ``folder``: its ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``.
        SDError when neither is there or readable, or a special token is not in the vocabulary."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            tok = _from_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = _from_vocab_merges(folder)
        else:
            raise SDError(f"{folder}: no tokenizer.json, nor vocab.json and merges.txt (a tokenizer folder needs one)")
        ids = {}
        for key, text in special_tokens(folder).items():
            ids[key] = tok.token_to_id(text)
            if ids[key] is None:
                raise SDError(f"{folder}: the {key} {text!r} is not in the tokenizer's vocabulary")
        return cls(tok, ids["bos_token"], ids["eos_token"], ids["pad_token"], length)

    def tokens(self, text: str) -> list[int]:
        """The ids of ``text`` without specials or padding."""
        return list(self.bpe.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str) -> np.ndarray:
        """[length] int32: bos, the tokens, eos, padding. SDError when the text is too long."""
        ids = self.tokens(text)
        if len(ids) > self.length - 2:
            raise SDError(f"the prompt {quote(text)} ({len(text)} characters) has {len(ids)} tokens; SD-1.x reads "
                          f"at most {self.length - 2}")
        out = [self.bos, *ids, self.eos]
        return np.array(out + [self.pad] * (self.length - len(out)), np.int32)

    def concept_mask(self, prompt: str, concept: str) -> np.ndarray:
        """[length] float32: 1 at the tokens of every occurrence of ``concept`` in ``prompt``
        (as whole words), else 0. SDError when the concept is not in the prompt."""
        if not concept.strip() or not word_pattern(concept).search(prompt):
            raise SDError(f"the concept {quote(concept)} is not a word of the prompt {quote(prompt)}")
        ids, word = list(self.encode(prompt)), self.tokens(concept)
        mask = np.zeros(self.length, np.float32)
        for i in range(len(ids) - len(word) + 1):
            if ids[i:i + len(word)] == word:
                mask[i:i + len(word)] = 1.0
        if not mask.any():
            raise SDError(f"the concept {quote(concept)} does not tokenize the same inside the prompt {quote(prompt)}")
        return mask


def _from_tokenizer_json(path: Path):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, its own padding and truncation off (a
    prompt too long must be refused, not cut)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library's own errors name the problem
        raise SDError(f"{path}: cannot be read by the tokenizers library ({exc})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def _from_vocab_merges(folder: Path):
    """CLIP's pipeline (module docstring) around the BPE of ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), end_of_word_suffix="</w>", unk_token=EOS,
                                   continuing_subword_prefix="", fuse_unk=False)
    except Exception as exc:  # noqa: BLE001 - the library's own errors name the problem
        raise SDError(f"{folder}: vocab.json / merges.txt cannot be read ({exc})") from None
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PIECES), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok
