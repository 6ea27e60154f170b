"""open_clip's CLIP tokenizer without torch: Python cleaning and split + HF ``tokenizers`` BPE.

Gives the ids of ``open_clip.get_tokenizer(name)(texts)`` (``SimpleTokenizer``, ``clean="lower"``):

1. clean exactly as open_clip does, in Python: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip``,
   whitespace collapse with ``str.split`` (Python's notion of whitespace), ``str.lower``;
2. split with open_clip's pattern ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
   [^\\s\\p{L}\\p{N}]+`` (``regex`` module, IGNORECASE), emulated with the character-class table of the
   bundle's ``pretokenizer.json`` (computed at export with the ``regex`` module itself, so Unicode version
   and case-folding quirks match the training environment);
3. byte map + BPE + ``[SOT] .. [EOT]`` with the bundle's ``tokenizer.json`` on the pre-split pieces;
4. truncate to ``context_length`` with the last kept id replaced by EOT, pad with 0, int64 ``[N, L]``.

Torch-free: stdlib, numpy, ftfy, tokenizers.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
PRETOKENIZER_FORMAT = "flatprompt-clip-pretokenizer/1"

# character classes of the split pattern
OTHER, LETTER, NUMBER, SPACE, IGNORED = 0, 1, 2, 3, 4
_N_CODE_POINTS = 0x110000


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, double HTML unescape, whitespace collapse, lower case."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class PreTokenizer:
    """open_clip's regex split (``regex.findall`` with IGNORECASE), driven by a ``pretokenizer.json`` table.

    Alternatives are tried in the pattern's order at each position: the literal alternatives (each character
    compared case-insensitively through ``literal_equivalents``), then a run of letters, one number, a run
    of "other" characters; a space or an ignored character starts no match and is skipped, as ``findall``
    does.
    """

    def __init__(self, table: dict[str, Any]) -> None:
        if table.get("format") != PRETOKENIZER_FORMAT:
            raise ValueError(
                f"pretokenizer table format {table.get('format')!r} is not {PRETOKENIZER_FORMAT!r}"
            )
        classes = bytearray(_N_CODE_POINTS)  # OTHER everywhere by default
        for key, value in (("letter", LETTER), ("number", NUMBER), ("space", SPACE), ("ignored", IGNORED)):
            for lo, hi in table[key]:
                hi = min(int(hi), _N_CODE_POINTS - 1)
                classes[int(lo) : hi + 1] = bytes([value]) * (hi + 1 - int(lo))
        self._classes = bytes(classes)
        self._equiv: dict[str, frozenset[str]] = {
            ch: frozenset(chr(cp) for cp in cps) for ch, cps in table["literal_equivalents"].items()
        }
        self.literals: list[str] = list(table["literals"])
        self._first = frozenset().union(*(self._equiv[lit[0]] for lit in self.literals))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PreTokenizer:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def _literal_at(self, text: str, i: int) -> int:
        """Length of the first literal alternative matching at ``i`` (0 when none does)."""
        for lit in self.literals:
            end = i + len(lit)
            if end <= len(text) and all(text[i + k] in self._equiv[c] for k, c in enumerate(lit)):
                return len(lit)
        return 0

    def split(self, text: str) -> list[str]:
        """The pieces ``regex.findall(pattern, text, IGNORECASE)`` returns."""
        cls = self._classes
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch in self._first:
                k = self._literal_at(text, i)
                if k:
                    out.append(text[i : i + k])
                    i += k
                    continue
            c = cls[ord(ch)]
            if c in (LETTER, OTHER):
                j = i + 1
                while j < n and cls[ord(text[j])] == c:
                    j += 1
                out.append(text[i:j])
                i = j
            elif c == NUMBER:
                out.append(ch)
                i += 1
            else:  # SPACE / IGNORED: no alternative matches here
                i += 1
        return out


class ClipTokenizer:
    """Tokenise prompt texts into CLIP token ids (int64 ``[N, context_length]``).

    Args:
        path: the ``tokenizer.json`` written by ``export.tokenizer.write_tokenizer_json``.
        pretokenizer_path: the ``pretokenizer.json`` next to it (``export.tokenizer.write_pretokenizer_json``);
            None splits with the regex inside ``tokenizer.json`` (Oniguruma), equal to open_clip except for
            rare Unicode corner cases (U+0345, characters newer than Oniguruma's Unicode tables, a special
            literal glued to punctuation).
        context_length: L, the text tower's sequence length (77 for CLIP).
        sot_id, eot_id, pad_id: special ids (from the bundle manifest).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        pretokenizer_path: str | os.PathLike[str] | None = None,
        context_length: int = 77,
        sot_id: int = SOT_ID,
        eot_id: int = EOT_ID,
        pad_id: int = PAD_ID,
    ) -> None:
        from tokenizers import Tokenizer, pre_tokenizers

        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.pretokenizer: PreTokenizer | None = None
        if pretokenizer_path is not None:
            self.pretokenizer = PreTokenizer.from_file(pretokenizer_path)
            # the pieces come pre-split exactly as open_clip splits: only the byte map remains to do
            self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._tok.no_truncation()
        self._tok.no_padding()
        self.context_length = int(context_length)
        self.sot_id = int(sot_id)
        self.eot_id = int(eot_id)
        self.pad_id = int(pad_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Untruncated ids ``[SOT] .. [EOT]`` for each text (after open_clip's cleaning and split)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        cleaned = [clean_text(t) for t in texts]
        if self.pretokenizer is None:
            encodings = self._tok.encode_batch(cleaned, add_special_tokens=True)
        else:
            pieces = [self.pretokenizer.split(t) for t in cleaned]
            encodings = self._tok.encode_batch(pieces, is_pretokenized=True, add_special_tokens=True)
        return [list(e.ids) for e in encodings]

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Token ids int64 ``[N, L]``: truncated with EOT last, zero padded (open_clip's layout)."""
        length = int(context_length or self.context_length)
        rows = self.encode(texts)
        out = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        for i, ids in enumerate(rows):
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_id
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Approximate text of ids (special and padding ids dropped); for logs and debugging only."""
        keep = [int(i) for i in ids if int(i) not in (self.sot_id, self.eot_id, self.pad_id)]
        return str(self._tok.decode(keep, skip_special_tokens=True))
