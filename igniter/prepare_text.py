"""``igniter prepare-text``: a text file or directory in, token shards and ``meta.json`` out.

The text (one file, or every file matching ``--pattern`` under a directory, concatenated in
sorted order of their relative paths, read as UTF-8) is split by characters: the first
``1 - val_fraction`` of it is ``train``, the rest ``val`` (nanoGPT's ``shakespeare_char``:
``int(n * 0.9)``). Each part is tokenized and written as shards
(:mod:`igniter.token_shards`) for the ``token_shards`` dataset.

Tokenizers (no downloads):

* ``char``: the sorted set of the text's characters (nanoGPT's character vocabulary; 65 for
  the Shakespeare file), listed in ``meta.json``.
* ``bpe``: a Hugging Face ``tokenizers`` byte-level BPE of ``--vocab-size`` tokens trained on the
  train part (``pip install 'igniter[lm]'``), written to ``tokenizer.json`` beside the shards.
* ``--tokenizer-file tokenizer.json``: an existing Hugging Face tokenizer, copied beside the shards.

The same input and options give the same files, byte for byte (no time stamps, no absolute
paths; BPE training is deterministic). Bad input (a missing or empty file, text that is not
UTF-8, a bad option) is one paragraph on stderr, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from igniter.atomic_files import atomic_write
from igniter.errors import EXIT_CONFIG
from igniter.token_shards import token_dtype, write_meta, write_split

__all__ = ["main", "prepare_text", "PrepareError", "DEFAULT_SHARD_TOKENS"]

#: Tokens per shard unless ``--shard-tokens`` says otherwise (200 MB of uint16).
DEFAULT_SHARD_TOKENS = 100_000_000
_LM_EXTRA = "pip install 'igniter[lm]'"


class PrepareError(ValueError):
    """Bad input to ``igniter prepare-text``; ``str()`` is the one-paragraph message."""


def _sources(source: Path, pattern: str) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(
            (p for p in source.rglob(pattern) if p.is_file()), key=lambda p: p.relative_to(source).as_posix()
        )
        if not files:
            raise PrepareError(f"igniter prepare-text: no file matching '{pattern}' under {source}")
        return files
    raise PrepareError(f"igniter prepare-text: input {source} does not exist (expected a text file or a directory)")


def _read_text(files: list[Path], source: Path) -> tuple[str, list[dict[str, Any]]]:
    parts, record = [], []
    for path in files:
        data = path.read_bytes()
        try:
            parts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PrepareError(f"igniter prepare-text: {path} is not UTF-8 text ({e})")
        name = path.name if path == source else path.relative_to(source).as_posix()
        record.append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    text = "".join(parts)
    if not text:
        raise PrepareError(f"igniter prepare-text: {source} holds no text (0 characters): nothing to tokenize")
    return text, record


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise PrepareError(f"igniter prepare-text: the BPE tokenizer needs Hugging Face tokenizers: {_LM_EXTRA}")
    return tokenizers


def _train_bpe(text: str, vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2's pre-tokenization, no prefix space) of ``vocab_size`` tokens trained on ``text``."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # after a newline between two non-space characters


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text``, encoded in chunks of about 1 MB cut after a newline that has a
    non-space character on both sides: GPT-2's pre-tokenization splits there anyway, so the
    ids are those of the whole text."""
    chunks, start = [], 0
    while start < len(text):
        found = _CUT.search(text, start + (1 << 20))
        end = found.start() if found else len(text)
        chunks.append(text[start:end])
        start = end
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(chunks)] if chunks else []
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def prepare_text(
    source: Path,
    output: Path,
    tokenizer: str = "char",
    vocab_size: int = 1024,
    tokenizer_file: Path | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    pattern: str = "*.txt",
) -> dict[str, Any]:
    """Tokenize ``source`` into shards under ``output``; returns the ``meta.json`` content.

    Args:
        source: a UTF-8 text file, or a directory (every file matching ``pattern``, recursively).
        output: the shard directory (created; files of the same names are replaced).
        tokenizer: ``char`` or ``bpe`` (ignored with ``tokenizer_file``).
        vocab_size: the BPE vocabulary size (``bpe`` only).
        tokenizer_file: a Hugging Face ``tokenizer.json`` to use instead of training one.
        val_fraction: the share of characters, at the end of the text, that goes to ``val``.
        shard_tokens: tokens per shard.

    Raises:
        PrepareError: bad input (nothing is written).
    """
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"igniter prepare-text: --val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise PrepareError(f"igniter prepare-text: --shard-tokens must be >= 1, got {shard_tokens}")
    if output.exists() and not output.is_dir():
        raise PrepareError(f"igniter prepare-text: output {output} exists and is not a directory")
    files = _sources(source, pattern)
    text, record = _read_text(files, source)
    cut = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:cut], "val": text[cut:]} if val_fraction > 0 else {"train": text}
    extra_files: dict[str, bytes] = {}
    if tokenizer_file is not None:
        if not tokenizer_file.is_file():
            raise PrepareError(f"igniter prepare-text: --tokenizer-file {tokenizer_file} does not exist")
        tk = _tokenizers()
        raw = tokenizer_file.read_bytes()
        try:
            hf = tk.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise PrepareError(f"igniter prepare-text: {tokenizer_file} is not a Hugging Face tokenizer.json ({e})")
        extra_files["tokenizer.json"] = raw
        info: dict[str, Any] = {"kind": "tokenizer.json", "file": "tokenizer.json"}
        vocab = hf.get_vocab_size(with_added_tokens=True)
        encoded = {name: _encode(hf, part) for name, part in parts.items()}
    elif tokenizer == "char":
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        info, vocab = {"kind": "char", "chars": chars}, len(chars)
        encoded = {name: np.fromiter((lookup[c] for c in part), np.int64, len(part)) for name, part in parts.items()}
    elif tokenizer == "bpe":
        if vocab_size < 257:
            raise PrepareError(
                f"igniter prepare-text: --vocab-size must be >= 257 for a byte-level BPE, got {vocab_size}"
            )
        hf = _train_bpe(parts["train"], vocab_size)
        extra_files["tokenizer.json"] = hf.to_str().encode("utf-8")
        info = {"kind": "bpe", "file": "tokenizer.json", "trained_vocab_size": vocab_size}
        vocab = hf.get_vocab_size(with_added_tokens=True)
        encoded = {name: _encode(hf, part) for name, part in parts.items()}
    else:
        raise PrepareError(f"igniter prepare-text: --tokenizer must be 'char' or 'bpe', got '{tokenizer}'")
    if "file" in info:
        info["sha256"] = hashlib.sha256(extra_files["tokenizer.json"]).hexdigest()
    # everything is checked: write
    output.mkdir(parents=True, exist_ok=True)
    for name, data in extra_files.items():
        atomic_write(output / name, lambda f, data=data: f.write(data))
    dtype = token_dtype(vocab)
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": info,
        "source": {"files": record, "characters": len(text), "val_fraction": val_fraction},
        "splits": {name: write_split(output, name, ids, dtype, shard_tokens) for name, ids in encoded.items()},
    }
    write_meta(output, meta)
    return meta


def main(argv: list[str]) -> int:
    """``igniter prepare-text INPUT OUTPUT [options]``; returns the exit status (0, or 2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="igniter prepare-text",
        description="Tokenize a text file or directory into token shards for the token_shards dataset.",
    )
    parser.add_argument("input", type=Path, help="a UTF-8 text file, or a directory of them")
    parser.add_argument("output", type=Path, help="the shard directory to write (meta.json, <split>_NNNNNN.bin)")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="default: char")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    parser.add_argument("--tokenizer-file", type=Path, default=None, help="an existing Hugging Face tokenizer.json")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the text for val (default 0.1)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--pattern", default="*.txt", help="files taken from a directory input (default *.txt)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_CONFIG
    try:
        meta = prepare_text(
            args.input,
            args.output,
            args.tokenizer,
            args.vocab_size,
            args.tokenizer_file,
            args.val_fraction,
            args.shard_tokens,
            args.pattern,
        )
    except PrepareError as e:
        print(f"{e}. Nothing was written.", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"igniter prepare-text: cannot read or write a file: {e}", file=sys.stderr)
        return EXIT_CONFIG
    splits = ", ".join(
        f"{name} {s['tokens']:,} tokens in {len(s['shards'])} shard(s)" for name, s in meta["splits"].items()
    )
    print(
        f"wrote {args.output}: {meta['tokenizer']['kind']} vocabulary of {meta['vocab_size']} ({meta['dtype']}), {splits}"
    )
    return 0
