"""The pretrained encoder file: the embedding and first GRU layer of a `BiGRULanguageModel`,
saved with the tokenizer they were trained with, and copied into a `BiGRUClassifier`.

    python scripts/pretrain_imdb.py ... --out runs/pretrain     -> runs/pretrain/encoder.pt (save_encoder)
    gru-nlp fit ... --model.encoder_path runs/pretrain/encoder.pt  (load_encoder, check_encoder_tokenizer, copy_encoder)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from gru_nlp.checkpoint import non_finite_weights
from gru_nlp.files import atomic_write
from gru_nlp.language_model import BiGRULanguageModel

ENCODER_FORMAT = "gru-nlp-encoder/1"
# The classifier parameters a pretrained encoder provides (BiGRUClassifier's names).
ENCODER_PARAMETERS = tuple(
    ["embedding.weight"]
    + [f"gru.{name}_l0{suffix}" for suffix in ("", "_reverse") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
)


class EncoderError(ValueError):
    """A pretrained encoder file that cannot be read or does not fit the model."""


def save_encoder(model: BiGRULanguageModel, tokenizer_json: str, path: str | Path) -> None:
    """Write the pretrained encoder with the tokenizer it was trained with (`atomic_write`: a failed
    save leaves the previous file whole)."""
    with atomic_write(Path(path), binary=True, sync=True) as file:
        torch.save({"format": ENCODER_FORMAT, "tokenizer": tokenizer_json, "weights": model.encoder_weights()}, file)


def load_encoder(path: str | Path) -> dict:
    """Read an encoder file from `save_encoder`: {"format", "tokenizer", "weights"}."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"pretrained encoder {path}: no such file")
    try:
        encoder = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: pickle, zip and torch errors all mean "not an encoder"
        # torch's messages run to many lines (advice on weights_only that does not apply here): keep the first.
        detail = next(iter(str(err).strip().splitlines()), "")
        raise EncoderError(f"pretrained encoder {path}: not a file written by save_encoder ({type(err).__name__}: {detail})") from None
    if not isinstance(encoder, dict) or encoder.get("format") != ENCODER_FORMAT:
        raise EncoderError(f"pretrained encoder {path}: not a file written by save_encoder (format {ENCODER_FORMAT} expected)")
    weights, tokenizer = encoder.get("weights"), encoder.get("tokenizer")
    if not isinstance(weights, dict) or not isinstance(tokenizer, str):
        raise EncoderError(f"pretrained encoder {path}: no weights or tokenizer in it")
    missing = [name for name in ENCODER_PARAMETERS if not isinstance(weights.get(name), Tensor)]
    if missing:
        raise EncoderError(f"pretrained encoder {path}: missing {', '.join(missing)}")
    broken = non_finite_weights({name: weights[name] for name in ENCODER_PARAMETERS})
    if broken:  # a pretraining that diverged: fine-tuning from it would train NaNs
        raise EncoderError(f"pretrained encoder {path}: {', '.join(broken)} hold NaN or infinite values")
    return encoder


def check_encoder_tokenizer(encoder: dict, tokenizer: Tokenizer, source: str | Path) -> None:
    """Refuse a tokenizer other than the encoder's: its embedding rows mean the tokens they were trained on."""
    ours, theirs = json.loads(tokenizer.to_str()), json.loads(encoder["tokenizer"])
    if any(ours.get(part) != theirs.get(part) for part in ("normalizer", "pre_tokenizer", "model")):
        raise EncoderError(
            f"pretrained encoder {source} was trained with another tokenizer than the data's: pass "
            "--data.tokenizer_path with the tokenizer.json saved beside it"
        )


def copy_encoder(model: nn.Module, weights: dict[str, Tensor], source: str | Path) -> None:
    """Copy pretrained encoder weights into a `BiGRUClassifier`'s embedding and first GRU layer."""
    parameters = dict(model.named_parameters())
    if parameters["embedding.weight"].size(0) != weights["embedding.weight"].size(0):
        raise EncoderError(
            f"pretrained encoder {source} has {weights['embedding.weight'].size(0)} token embeddings and the model "
            f"{parameters['embedding.weight'].size(0)}: train with the tokenizer saved beside it (--data.tokenizer_path)"
        )
    for name in ENCODER_PARAMETERS:
        if name not in parameters:
            raise EncoderError(f"pretrained encoder {source}: the model has no {name} (a bidirectional GRU is needed)")
        if parameters[name].shape != weights[name].shape:
            raise EncoderError(
                f"pretrained encoder {source}: {name} is {tuple(weights[name].shape)} there and "
                f"{tuple(parameters[name].shape)} in the model: pretrain with the model's embedding_dim and hidden_size"
            )
    with torch.no_grad():
        for name in ENCODER_PARAMETERS:
            parameters[name].copy_(weights[name])
