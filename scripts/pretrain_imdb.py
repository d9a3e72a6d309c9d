"""Pretrain the classifier's embedding and first GRU layer as a language model on IMDB text.

Trains a tokenizer on the labelled training reviews and the 50,000 unlabelled ones (never
the test reviews), then a bidirectional language model (`gru_nlp.language_model`) on the
same texts, and writes into `--out`:

    tokenizer.json   the tokenizer, for `--data.tokenizer_path`
    encoder.pt       the embedding and first GRU layer, for `--model.encoder_path`

then fine-tune from them:

    python scripts/pretrain_imdb.py --data ../shared/data/imdb --out runs/pretrain
    python scripts/train_imdb.py --data.path ../shared/data/imdb \\
        --data.tokenizer_path runs/pretrain/tokenizer.json --model.encoder_path runs/pretrain/encoder.pt

`--data` is read as `gru-nlp fit` reads `--data.path`: a folder of data files named by split
(`train.parquet` and `unsup.parquet` in ../shared/data/imdb), the original `aclImdb/` folder
(whose `train/unsup/` is the split `unsup`), or a Hugging Face dataset, with
`--splits train unsupervised` for `stanfordnlp/imdb`.
The last 1% of the texts (at most 500) are held out to report the language model's
validation loss, in nats per predicted token.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NoReturn

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from gru_nlp.batching import BucketBatchSampler, collate
from gru_nlp.callbacks import OutputFolderError, check_output_folder
from gru_nlp.data import DataError, load_texts
from gru_nlp.encoder import save_encoder
from gru_nlp.lightning_cli import SIGTERM_EXIT_STATUS
from gru_nlp.lit import LitLanguageModel
from gru_nlp.tokenizer import PAD_ID, encode, save_tokenizer, train_tokenizer


def fail(message: str) -> NoReturn:
    """A user's mistake or an unusable run: one line on stderr, exit status 2 (as the gru-nlp command)."""
    print(f"pretrain_imdb: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/imdb")
    parser.add_argument("--splits", nargs="+", default=["train", "unsup"], help="splits whose texts the model reads")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--out", default="runs/pretrain", help="folder for tokenizer.json, encoder.pt and the logs")
    parser.add_argument("--vocab-size", type=int, default=30000, help="as configs/imdb.yaml")
    parser.add_argument("--max-length", type=int, default=400, help="tokens read per text (its head)")
    parser.add_argument("--embedding-dim", type=int, default=128, help="as the classifier's model.embedding_dim")
    parser.add_argument("--hidden-size", type=int, default=128, help="as the classifier's model.hidden_size")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the texts (a fraction stops early)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    for name in ("vocab_size", "max_length", "embedding_dim", "hidden_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs <= 0 or args.lr <= 0:
        parser.error("--epochs and --lr must be above 0")
    if args.max_length < 2:
        parser.error("--max-length must be at least 2: a language model predicts each token from the others")
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)

    out = Path(args.out)
    try:
        check_output_folder(out, option="--out")  # before minutes of tokenizer training, not after
        texts = load_texts(args.data, args.splits, args.text_field)
    except (DataError, OutputFolderError) as err:
        fail(str(err))
    if len(texts) < 2:
        fail(f"{args.data} has {len(texts)} non-blank texts in {', '.join(args.splits)}; at least 2 are needed")
    try:
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    except ValueError as err:
        fail(f"could not train a tokenizer: {err}")
    ids = encode(tokenizer, texts, args.max_length, "head")
    held_out = max(1, min(500, len(ids) // 100))
    train_ids, val_ids = ids[:-held_out], ids[-held_out:]
    if max(map(len, train_ids), default=0) < 2:
        fail(f"every training text of {args.data} is one token or none: there is nothing to predict")
    print(f"{len(texts):,} texts ({held_out:,} held out), {sum(map(len, ids)):,} tokens, {(time.perf_counter() - start) / 60:.1f} min", flush=True)

    lit = LitLanguageModel(tokenizer.get_vocab_size(), args.embedding_dim, args.hidden_size, PAD_ID, lr=args.lr)
    counts = torch.bincount(torch.cat([torch.tensor(text) for text in train_ids]), minlength=tokenizer.get_vocab_size())
    lit.model.set_token_counts(counts)

    def loader(sequences: list[list[int]], shuffle: bool) -> DataLoader:
        examples = [{"input_ids": sequence} for sequence in sequences]
        sampler = BucketBatchSampler([len(sequence) for sequence in sequences], args.batch_size, shuffle=shuffle, seed=args.seed)
        return DataLoader(examples, batch_sampler=sampler, collate_fn=collate)

    class SaveEncoder(L.Callback):
        """After every validation: print the loss and save the encoder with its tokenizer, so a stopped
        run keeps its latest pair (and a run that fails before its first validation, an earlier run's)."""

        saved_step: int | None = None

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            val_loss = float(trainer.callback_metrics["val/loss"])
            if not math.isfinite(val_loss):  # diverged: keep the last good pair rather than write NaN weights
                fail(f"val/loss is {val_loss} at step {trainer.global_step}: training diverged (try a lower --lr); "
                     + (f"{out} keeps the pair from step {self.saved_step}" if self.saved_step else "nothing was written"))
            save_encoder(lit.model, tokenizer.to_str(), out / "encoder.pt")
            save_tokenizer(tokenizer, out / "tokenizer.json")
            self.saved_step = trainer.global_step
            minutes = (time.perf_counter() - start) / 60
            print(f"step {trainer.global_step}: val/loss {val_loss:.4f}, {minutes:.1f} min", flush=True)

    steps_per_epoch = -(-len(train_ids) // args.batch_size)
    trainer = L.Trainer(
        devices=1,  # one process (a GPU where there is one): the loaders and the encoder saves are written for one
        max_steps=max(1, round(args.epochs * steps_per_epoch)),
        gradient_clip_val=1.0,
        default_root_dir=args.out,
        val_check_interval=min(steps_per_epoch, 500),
        check_val_every_n_epoch=None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=50,
        callbacks=[saver := SaveEncoder()],
    )
    val_loader = loader(val_ids, shuffle=False)
    try:
        trainer.fit(lit, loader(train_ids, shuffle=True), val_loader)
    except SIGTERMException:  # a SystemExit with status 0 from Lightning: say what was kept, and exit 143
        kept = f"{out} holds the encoder and tokenizer of step {saver.saved_step}" if saver.saved_step else "nothing was written"
        print(f"pretrain_imdb: stopped by SIGTERM at step {trainer.global_step}; {kept}", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    if trainer.global_step % trainer.val_check_interval:  # the last steps ran after the last validation
        trainer.validate(lit, val_loader, verbose=False)
    val_loss = float(trainer.callback_metrics["val/loss"])
    print(
        f"val/loss {val_loss:.4f} nats per token (perplexity {torch.tensor(val_loss).exp():.1f}) after {trainer.global_step} steps, "
        f"{(time.perf_counter() - start) / 60:.1f} min; wrote {out / 'tokenizer.json'} and {out / 'encoder.pt'}"
    )


if __name__ == "__main__":
    main()
