"""Train, save, load and apply a subword tokenizer.

The tokenizer is a plain `tokenizers.Tokenizer` so that it can be saved as one
`tokenizer.json` next to a checkpoint and loaded at inference without `datasets`.
Id 0 is always `[PAD]` and id 1 is always `[UNK]`; the collate function pads
with `PAD_ID`, and the model is told the padding id (`pad_id`).
"""

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Literal, get_args

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from gru_nlp.files import atomic_write

TokenizerModel = Literal["wordpiece", "bpe"]
TOKENIZER_MODELS: tuple[str, ...] = get_args(TokenizerModel)
# Which tokens a text longer than max_length keeps (`encode`).
Truncation = Literal["head", "head_tail"]
TRUNCATIONS: tuple[str, ...] = get_args(Truncation)

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN]  # order fixes the ids above

# Marks subwords that continue a word, for both models, so one WordPiece decoder
# can glue either model's tokens back into words.
SUBWORD_PREFIX = "##"

_TRAIN_BATCH_SIZE = 1000
# The longest word WordPiece splits into subwords rather than reading as one [UNK].
_LONGEST_WORD = 1000


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 30000,
    model: TokenizerModel = "wordpiece",
    lowercase: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a subword tokenizer on raw texts.

    The normalizer drops invisible format characters (Unicode category Cf),
    replaces HTML line breaks (`<br />`, common in IMDB) with a space, applies
    NFKC, spaces out CJK ideographs, and optionally lowercases; the
    pre-tokenizer splits on whitespace and punctuation (BERT's rules).

    Args:
        texts: The training texts; read once, in batches.
        vocab_size: The largest vocabulary, special tokens included.
        model: `"wordpiece"` or `"bpe"` subwords.
        lowercase: Whether to lowercase before splitting.
        min_frequency: How often a pair must occur to be merged into a new token.

    Returns:
        The trained tokenizer, with `[PAD]` at id 0 and `[UNK]` at id 1. It
        encodes text that spells a special token as plain text.

    Raises:
        ValueError: If an argument is out of range or `texts` is empty.
    """
    if model not in TOKENIZER_MODELS:
        raise ValueError(f"model must be 'wordpiece' or 'bpe', got {model!r}")
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS)}, got {vocab_size}")

    if model == "wordpiece":
        # A word longer than max_input_chars_per_word (100 by default) becomes one [UNK]; split into
        # subwords instead, so a long unbroken run of letters is still read.
        tokenizer = Tokenizer(
            models.WordPiece(
                unk_token=UNK_TOKEN, continuing_subword_prefix=SUBWORD_PREFIX, max_input_chars_per_word=_LONGEST_WORD
            )
        )
        trainer_cls = trainers.WordPieceTrainer
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, continuing_subword_prefix=SUBWORD_PREFIX))
        trainer_cls = trainers.BpeTrainer
    steps = [
        # Invisible format characters (a byte-order mark, a zero-width space, a soft hyphen) are dropped:
        # glued to a word, they would turn the whole word into [UNK].
        normalizers.Replace(Regex(r"\p{Cf}"), ""),
        normalizers.Replace(Regex(r"(?i)<br\s*/?>"), " "),
        normalizers.NFKC(),
        # Chinese, Japanese and Korean ideographs are written without spaces: one word each, as in BERT.
        normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False),
    ]
    if lowercase:
        steps.append(normalizers.Lowercase())
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=SUBWORD_PREFIX)
    trainer = trainer_cls(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix=SUBWORD_PREFIX,
        show_progress=False,
    )

    count = 0

    def batches() -> Iterator[list[str]]:
        nonlocal count
        iterator = iter(texts)
        while batch := list(islice(iterator, _TRAIN_BATCH_SIZE)):
            count += len(batch)
            yield batch

    tokenizer.train_from_iterator(batches(), trainer=trainer)
    if count == 0:
        raise ValueError("cannot train a tokenizer on no texts")
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Save `tokenizer` as JSON at `path`, atomically (`gru_nlp.files.atomic_write`): a reader
    (another process of a DDP run, say) sees either no file or a whole one."""
    with atomic_write(Path(path)) as file:
        file.write(tokenizer.to_str())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by `save_tokenizer` (or any compatible `tokenizer.json`).

    Padding and truncation settings stored in the file are switched off, because
    `encode` truncates and `collate` pads.

    Raises:
        FileNotFoundError: If there is no file at `path`.
        ValueError: If the file is not a tokenizer JSON, or `[PAD]` is not id 0
            or `[UNK]` is not id 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}: pass the tokenizer.json saved with the model")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from err
    for token, expected in ((PAD_TOKEN, PAD_ID), (UNK_TOKEN, UNK_ID)):
        if tokenizer.token_to_id(token) != expected:
            raise ValueError(
                f"tokenizer at {path} must have {token} at id {expected}, "
                f"found id {tokenizer.token_to_id(token)}: train it with gru_nlp.tokenizer.train_tokenizer"
            )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.encode_special_tokens = True  # not saved in the file
    return tokenizer


def encode(
    tokenizer: Tokenizer,
    texts: list[str],
    max_length: int,
    truncation: Truncation = "head_tail",
) -> list[list[int]]:
    """Encode texts to token ids, truncated to at most `max_length` tokens.

    `"head"` keeps the first `max_length` tokens. `"head_tail"` keeps the first
    `max_length // 4` and the last `max_length - max_length // 4` tokens (128 + 384
    for 512): reviews tend to state their verdict at the end, and Sun et al. (2019,
    "How to Fine-Tune BERT for Text Classification") found head 128 + tail 382
    the best cut on IMDB.

    No special tokens are added, and text that spells one (`"[PAD]"`) is read as
    plain text, so that id 0 only ever means padding. For that this function sets
    `tokenizer.encode_special_tokens`, which `tokenizer.json` does not store, so a
    tokenizer rebuilt from JSON elsewhere (a checkpoint) encodes the same.

    A text that encodes to nothing (empty, or only whitespace) becomes `[UNK_ID]`,
    so that every sequence has length >= 1: the GRU reads at least one step, and attention
    pooling has at least one position to attend to.

    Args:
        tokenizer: A tokenizer from `train_tokenizer` or `load_tokenizer`.
        texts: The texts to encode.
        max_length: The most tokens to keep per text, at least 1.
        truncation: Which tokens to keep from a longer text.

    Returns:
        One list of ids per text, each of length 1 to `max_length`.
    """
    kept_positions(0, max_length, truncation)  # checks the settings before any text is encoded
    tokenizer.encode_special_tokens = True
    sequences = []
    for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        ids = encoding.ids
        if len(ids) > max_length:
            ids = [ids[position] for position in kept_positions(len(ids), max_length, truncation)]
        sequences.append(ids or [UNK_ID])
    return sequences


def kept_positions(num_tokens: int, max_length: int, truncation: Truncation) -> list[int]:
    """Which of a text's `num_tokens` token positions `encode` keeps, in order (see `encode`)."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be 'head' or 'head_tail', got {truncation!r}")
    if num_tokens <= max_length:
        return list(range(num_tokens))
    head = max_length if truncation == "head" else max_length // 4
    return list(range(head)) + list(range(num_tokens - (max_length - head), num_tokens))
