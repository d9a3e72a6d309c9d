"""Shared fixtures: a real Lightning checkpoint of a tiny trained classifier."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

TINY_LABELS = ["neg", "neu", "pos"]
TINY_TEXTS = [
    ("a bad dull film , awful acting", 0),
    ("bad plot and a boring , awful ending", 0),
    ("truly awful . bad bad bad", 0),
    ("an okay film , fine but plain", 1),
    ("it was okay , a plain average story", 1),
    ("fine . okay . average", 1),
    ("a good film with great acting", 2),
    ("great story , good ending , lovely", 2),
    ("lovely and great , really good", 2),
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a `.ckpt` saved by `trainer.save_checkpoint` from a LitClassifier fitted a few steps.

    Odd, all-different sizes (vocab ~60, embedding 8, hidden 6, 3 classes, 2 bidirectional
    layers) so a swapped dimension cannot pass; takes a few seconds on CPU.
    """
    import lightning as L

    from gru_nlp.lit import LitClassifier
    from gru_nlp.tokenizer import PAD_ID, encode, train_tokenizer

    torch.manual_seed(0)
    texts = [text for text, _ in TINY_TEXTS]
    tokenizer = train_tokenizer(texts * 3, vocab_size=60, model="wordpiece", min_frequency=1)
    ids = encode(tokenizer, texts, max_length=9, truncation="head_tail")
    input_ids = torch.full((len(ids), max(map(len, ids))), PAD_ID)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
    batch = {
        "input_ids": input_ids,
        "lengths": torch.tensor([len(seq) for seq in ids]),
        "labels": torch.tensor([label for _, label in TINY_TEXTS]),
    }
    lit = LitClassifier(
        vocab_size=tokenizer.get_vocab_size(),
        num_classes=3,
        label_names=TINY_LABELS,
        pad_id=PAD_ID,
        embedding_dim=8,
        hidden_size=6,
        num_layers=2,
        dropout=0.1,
        lr=0.02,
        warmup=0.0,
    )
    trainer = L.Trainer(
        max_steps=15,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # "no val_dataloader" and friends: expected for a fixture, noise in the test report.
        warnings.simplefilter("ignore")
        # One fixed batch, repeated: batch_size=None hands it over without collating.
        trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    lit.inference_config = {"tokenizer": tokenizer.to_str(), "max_length": 9, "truncation": "head_tail"}
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path
