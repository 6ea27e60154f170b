"""Build an HF ``tokenizers`` ``tokenizer.json`` offline from open_clip's own BPE vocabulary.

open_clip's ``SimpleTokenizer`` (a copy of OpenAI's CLIP tokenizer) is a byte-level BPE:

- vocabulary = the 256 byte symbols of GPT-2's ``bytes_to_unicode`` table, the same 256 with the ``</w>``
  end-of-word suffix, one token per merge (48 894 merges, lines 1..48894 of ``bpe_simple_vocab_16e6.txt.gz``)
  and the two special tokens ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407);
- pre-tokenisation = the regex ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+`` on the cleaned, lower-cased text, each piece mapped byte-wise to the byte symbols;
- BPE merges by rank, ``</w>`` appended to the last symbol of each piece.

The same model is expressed with ``tokenizers`` building blocks: ``Split`` (the regex, ``invert=True``),
``ByteLevel`` (``use_regex=False``: the byte map only), ``BPE(end_of_word_suffix="</w>")`` and the two
specials as added tokens. Used alone, ``tokenizer.json`` gives open_clip's ids for ordinary cleaned text.

Two things are NOT exact in the JSON, so the runtime (:mod:`serving.runtime.tokenizer`) does them in Python:

- the text cleaning (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, ``str.lower``);
- the regex split: open_clip uses the ``regex`` module with ``IGNORECASE``, whose Unicode tables and
  case-folding differ from the Oniguruma engine inside ``tokenizers`` (a newer Unicode version; U+0345
  matches no alternative; ``'ſ`` matches ``'s``; a special literal right after punctuation is not split
  out). ``pretokenizer.json`` therefore records, computed here with the very ``regex`` module open_clip
  uses, the code-point ranges of each character class of the pattern and the case-insensitive
  equivalents of the literal characters; the runtime scans with that table, feeds the pieces
  pre-tokenised to ``tokenizers`` (byte map + BPE only) and gets open_clip's ids for any string.

Nothing here downloads anything; the BPE file ships inside the open_clip wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

from serving.runtime.manifest import JSONObject, TokenizerInfo
from trainer.errors import UserError

_logger = logging.getLogger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # open_clip reads merges[1 : 49152 - 256 - 2 + 1]
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
VOCAB_SIZE = 49408
SPLIT_PATTERN = "<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"
CLEAN_DESCRIPTION = (
    "ftfy.fix_text + html.unescape twice + strip + whitespace collapse (str.split) + str.lower, in Python"
)


def default_bpe_path() -> Path:
    """open_clip's packaged BPE merges file (found without importing open_clip, which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise UserError("open_clip is not installed: pip install 'flatprompt[export]'")
    path = Path(spec.origin).parent / BPE_FILE_NAME
    if not path.is_file():
        raise UserError(f"open_clip's BPE file {path} is missing: reinstall open_clip_torch")
    return path


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_bpe(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merges in rank order, exactly as ``SimpleTokenizer`` builds them."""
    p = Path(path) if path is not None else default_bpe_path()
    try:
        with gzip.open(p) as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"BPE file {p} is unreadable ({e}): reinstall open_clip_torch") from e
    raw = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(raw) != N_MERGES or any(len(m) != 2 for m in raw):
        raise UserError(
            f"BPE file {p} does not hold {N_MERGES} merges: it is not open_clip's CLIP vocabulary"
        )
    merges: list[tuple[str, str]] = [(m[0], m[1]) for m in raw]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[SOT_TOKEN] != SOT_ID or vocab[EOT_TOKEN] != EOT_ID:
        raise UserError(
            f"BPE file {p} gives {len(vocab)} tokens, expected {VOCAB_SIZE}: not CLIP's vocabulary"
        )
    return vocab, merges


def build_tokenizer(bpe_path: str | Path | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` equal to open_clip's ``SimpleTokenizer`` on cleaned text.

    ``encode(text)`` gives ``[SOT] ids [EOT]`` with no truncation or padding (the runtime does both the
    open_clip way: cut to the context length, last kept id := EOT, pad with 0).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = read_bpe(bpe_path)
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(model)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.add_special_tokens(
        [
            AddedToken(SOT_TOKEN, special=True, normalized=False),
            AddedToken(EOT_TOKEN, special=True, normalized=False),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, SOT_ID), (EOT_TOKEN, EOT_ID)],
    )
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    return tok


PRETOKENIZER_FORMAT = "flatprompt-clip-pretokenizer/1"
LITERALS = ["<start_of_text>", "<end_of_text>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]


class PretokenizerTable(TypedDict):
    """``pretokenizer.json`` (:func:`build_pretokenizer_table`)."""

    format: str
    pattern: str
    flags: str
    source: str
    literals: list[str]
    letter: list[list[int]]
    number: list[list[int]]
    space: list[list[int]]
    ignored: list[list[int]]
    literal_equivalents: dict[str, list[int]]


def _all_code_points() -> list[tuple[int, str]]:
    """(offset, text) chunks holding every code point except the surrogates, in order."""
    return [
        (0, "".join(map(chr, range(0xD800)))),
        (0xE000, "".join(map(chr, range(0xE000, 0x110000)))),
    ]


def _class_ranges(rx: Any) -> list[list[int]]:
    """Inclusive code-point ranges [lo, hi] of maximal runs that ``rx`` (a one-char class + ``+``) matches."""
    out: list[list[int]] = []
    for offset, text in _all_code_points():
        for m in rx.finditer(text):
            lo, hi = offset + m.start(), offset + m.end() - 1
            if out and out[-1][1] + 1 == lo:
                out[-1][1] = hi
            else:
                out.append([lo, hi])
    return out


def _complement(ranges: list[list[int]]) -> list[list[int]]:
    """Code points (surrogates excluded) covered by none of ``ranges``."""
    covered = [*sorted([*ranges, [0xD800, 0xDFFF]]), [0x110000, 0x110000]]
    out: list[list[int]] = []
    nxt = 0
    for lo, hi in covered:
        if lo > nxt:
            out.append([nxt, lo - 1])
        nxt = max(nxt, hi + 1)
    return out


def build_pretokenizer_table() -> PretokenizerTable:
    """Character classes of open_clip's split pattern, as the ``regex`` module (IGNORECASE) sees them.

    Classes: ``letter`` ([\\p{L}]), ``number`` ([\\p{N}]), ``space`` (\\s: matched by nothing, skipped),
    ``other`` ([^\\s\\p{L}\\p{N}]); code points in none of the listed ranges are ``other``, except those in
    ``ignored`` (matched by no alternative at all, e.g. U+0345 under IGNORECASE). ``literal_equivalents``
    maps each character of the literal alternatives to the code points matching it case-insensitively.
    """
    import regex

    flags = regex.IGNORECASE
    letter = _class_ranges(regex.compile(r"[\p{L}]+", flags))
    number = _class_ranges(regex.compile(r"[\p{N}]+", flags))
    space = _class_ranges(regex.compile(r"\s+", flags))
    other = _class_ranges(regex.compile(r"[^\s\p{L}\p{N}]+", flags))
    ignored = _complement(letter + number + space + other)
    equivalents: dict[str, list[int]] = {}
    chunks = _all_code_points()
    for ch in sorted({c for lit in LITERALS for c in lit}):
        rx = regex.compile(regex.escape(ch), flags)
        equivalents[ch] = sorted(offset + m.start() for offset, text in chunks for m in rx.finditer(text))
    return {
        "format": PRETOKENIZER_FORMAT,
        "pattern": SPLIT_PATTERN,
        "flags": "IGNORECASE",
        "source": f"regex {regex.__version__}",
        "literals": LITERALS,
        "letter": letter,
        "number": number,
        "space": space,
        "ignored": ignored,
        "literal_equivalents": equivalents,
    }


def write_pretokenizer_json(path: str | Path) -> Path:
    """Write ``pretokenizer.json`` (see :func:`build_pretokenizer_table`) and return its path."""
    out = Path(path)
    out.write_text(json.dumps(build_pretokenizer_table(), separators=(",", ":")), encoding="utf-8")
    _logger.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


def tokenizer_info(
    context_length: int, file_name: str = "tokenizer.json", pretokenizer_file: str | None = None
) -> TokenizerInfo:
    """The ``tokenizer`` section of a bundle manifest.

    ``pretokenizer_file`` names the ``pretokenizer.json`` shipped next to ``tokenizer.json`` (the exporter
    always writes one); without it the runtime splits with the JSON's own regex (open_clip's ids except
    for the corner cases listed in the module docstring).
    """
    return TokenizerInfo(
        file=file_name,
        pretokenizer_file=pretokenizer_file or None,
        kind="open_clip.SimpleTokenizer",
        sot_id=SOT_ID,
        eot_id=EOT_ID,
        pad_id=PAD_ID,
        vocab_size=VOCAB_SIZE,
        context_length=int(context_length),
        lowercase=True,
        clean=CLEAN_DESCRIPTION,
        truncate="cut to context_length, last kept id := eot_id",
    )


def tokenizer_manifest(
    context_length: int, file_name: str = "tokenizer.json", pretokenizer_file: str | None = None
) -> JSONObject:
    """:func:`tokenizer_info` as the JSON object written to ``manifest.json``."""
    return tokenizer_info(context_length, file_name, pretokenizer_file).to_dict()


def write_tokenizer_json(path: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``tokenizer.json`` (deterministic bytes for a given open_clip vocabulary) and return its path."""
    out = Path(path)
    tok = build_tokenizer(bpe_path)
    text = tok.to_str(pretty=False)
    json.loads(text)  # sanity: valid JSON
    out.write_text(text, encoding="utf-8")
    _logger.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out
