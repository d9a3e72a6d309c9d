"""Classify and explain texts with a trained checkpoint, without Lightning or ``datasets``.

    classifier = TextClassifier.from_checkpoint("best.ckpt")
    classifier.predict("A quiet, moving film.")        # Prediction(label='pos', score=0.93, ...)
    classifier.explain("A quiet, moving film.").to_terminal()

Shape legend: N texts, B batch, T padded length, E embedding dim, K classes, W words.

Decisions a user should know:

* **Empty texts** (or texts of only whitespace, control and format characters, such as
  "\\x00\\x01" or a zero-width space) are still classified: the encoder gives them [UNK]
  tokens, so the model answers from placeholders that carry no information about the
  text. Such predictions have ``empty=True``; treat their label as a prior, not a reading.
* **Long texts** are truncated to the checkpoint's ``max_length`` tokens with the policy
  it was trained with ("head" keeps the start, "head_tail" the start and the end).
  ``num_tokens`` says how many tokens the model read.
* **Batching** sorts texts by length so each batch pads little, then restores input order.
  Results do not depend on the order of the input, but the last float bits of a text's
  probabilities may differ with the texts batched beside it (different matrix shapes).
* **int8** (``quantize=True``): dynamic quantization of the Linear layers and of the GRU,
  which is run as one int8 ``nn.GRU`` per layer and direction (``PaddingSafeGRU`` itself is
  not an ``nn.GRU``, so ``quantize_dynamic`` alone would skip it). CPU only. Explanations
  always use the fp32 weights, because gradients do not flow through int8 kernels. Those
  ``nn.GRU`` layers do not use the GRU's compiled steps, so where they compiled, fp32 served
  faster than int8 (README); int8 saves memory, not time.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import html
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, overload

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch import Tensor, nn

from gru_nlp.batching import collate
from gru_nlp.checkpoint import CHECKPOINT_KEY, build_model, load_checkpoint
from gru_nlp.gates import reference_gru, update_strength
from gru_nlp.gru import PaddingSafeGRU, reverse_within_lengths
from gru_nlp.labels import integer_label_ids
from gru_nlp.model import BiGRUClassifier, ClassifierOutput
from gru_nlp.tokenizer import UNK_ID, encode, kept_positions

Method = Literal["attention", "integrated_gradients", "grad_x_input"]
METHODS: tuple[str, ...] = get_args(Method)
INTEGRATED_GRADIENTS_STEPS = 32


@dataclass(frozen=True)
class Prediction:
    """One text's prediction.

    Attributes:
        text: the input text, unchanged.
        label: the most probable label's name.
        score: that label's probability.
        probs: every label's probability, in the checkpoint's label order; they sum to 1.
        num_tokens: tokens the model read, after truncation (at least 1).
        empty: True when the text had nothing to read (no tokens, or only whitespace, control
            and format characters) and was classified from placeholder tokens.
    """

    text: str
    label: str
    score: float
    probs: dict[str, float]
    num_tokens: int
    empty: bool = False

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form used by ``gru-nlp classify``; ``"empty": True`` marks a text with nothing to read."""
        record = {"text": self.text, "label": self.label, "score": self.score, "probs": self.probs}
        return record | {"empty": True} if self.empty else record


@dataclass(frozen=True)
class Explanation:
    """Which words a prediction rests on.

    Words are the whitespace-separated runs of the original text, spelled as written;
    ``spans[i]`` is word i's (start, end) character range, so ``text[start:end] ==
    words[i]``. A word's score is the sum over its subword tokens. Scripts written without
    spaces therefore give long "words"; ``tokens`` / ``token_weights`` keep the finer view.

    Attributes:
        text: the input text.
        words: (W,) words of the text, in order.
        spans: (W,) their character ranges in ``text``.
        weights: (W,) non-negative, summing to 1 over the words (empty for a text without
            words). For "attention", each word's share of the pooling weights. For the
            gradient methods, each word's share of the total |attribution|.
        attributions: (W,) signed scores. For "attention", equal to ``weights``. For the
            gradient methods, in logits of the predicted label: positive words push
            towards it, negative words away from it.
        prediction: the fp32 model's prediction for the text.
        method: how the scores were computed.
        tokens: (T,) the subword tokens the model read, as spelled in the text ("" for
            tokens that came from no characters, such as the placeholder of an empty text).
        token_weights: (T,) the per-token scores before merging (same units as
            ``attributions``).
        gates: (L, D, W) with ``gates=True``: per layer and direction, how strongly the
            update gate rewrote the state at each word, the mean over units of (1 − z_t)
            averaged over the word's tokens (0: kept the state, 1: overwrote it);
            NaN for words with no token. None otherwise.
    """

    text: str
    words: list[str]
    spans: list[tuple[int, int]]
    weights: np.ndarray
    attributions: np.ndarray
    prediction: Prediction
    method: str
    tokens: list[str] = field(default_factory=list)
    token_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    gates: np.ndarray | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form that ``gru-nlp classify --explain`` adds to each line: the method, the label
        explained (the fp32 model's), and per word its weight and signed attribution."""
        return {
            "method": self.method,
            "label": self.prediction.label,
            "words": self.words,
            "weights": [round(float(weight), 6) for weight in self.weights],
            "attributions": [round(float(attribution), 6) for attribution in self.attributions],
        }

    def to_html(self) -> str:
        """The text with each word's background shaded by its weight (HTML-escaped).

        Attention weights shade blue; gradient attributions shade green where a word
        supports the predicted label and red where it opposes it.
        """
        signed = self.method != "attention"
        peak = float(np.abs(self.attributions).max()) if len(self.words) else 0.0
        parts, cursor = [], 0
        for word, (start, end), score in zip(self.words, self.spans, self.attributions):
            parts.append(html.escape(self.text[cursor:start]))
            alpha = abs(float(score)) / peak if peak > 0 else 0.0
            rgb = ("40, 160, 60" if score >= 0 else "210, 50, 50") if signed else "30, 100, 230"
            parts.append(
                f'<span style="background-color: rgba({rgb}, {alpha:.3f})" '
                f'title="{float(score):+.4f}">{html.escape(word)}</span>'
            )
            cursor = end
        parts.append(html.escape(self.text[cursor:]))
        header = html.escape(f"{self.prediction.label} ({self.prediction.score:.3f}), {self.method}")
        return f'<div class="gru-nlp-explanation"><p><b>{header}</b></p><p>{"".join(parts)}</p></div>'

    def to_terminal(self, color: bool | None = None, width: int = 30) -> str:
        """A rendering for a terminal.

        Args:
            color: ANSI colours (words on a background shaded by weight); by default only
                when stdout is a terminal. Without colour: one line per word with a bar.
            width: the longest bar, in characters (plain rendering).
        """
        if color is None:
            color = sys.stdout.isatty()
        header = f"{self.prediction.label} ({self.prediction.score:.3f}), {self.method}"
        peak = float(np.abs(self.attributions).max()) if len(self.words) else 0.0
        if color:
            parts, cursor = [], 0
            for word, (start, end), score in zip(self.words, self.spans, self.attributions):
                level = round(5 * abs(float(score)) / peak) if peak > 0 else 0
                # 256-colour cube: green (supports) or red (opposes); blue for attention.
                if self.method == "attention":
                    code = 16 + level  # black to blue
                else:
                    code = 16 + (6 * level if score >= 0 else 36 * level)
                parts.append(self.text[cursor:start] + f"\x1b[48;5;{code}m{word}\x1b[0m")
                cursor = end
            return header + "\n" + "".join(parts) + self.text[cursor:]
        name_width = min(24, max((len(word) for word in self.words), default=0))
        lines = [header]
        for word, score in zip(self.words, self.attributions):
            bar = "#" * round(width * abs(float(score)) / peak) if peak > 0 else ""
            sign = "-" if score < 0 else " "
            lines.append(f"{word[:name_width]:<{name_width}} {sign}{bar:<{width}} {float(score):+.4f}")
        return "\n".join(lines)


class TextClassifier:
    """A trained BiGRU classifier with its tokenizer, ready to classify raw text.

    Build it with ``TextClassifier.from_checkpoint``.
    """

    def __init__(
        self,
        model: BiGRUClassifier,
        tokenizer: Tokenizer,
        label_names: list[str],
        max_length: int,
        truncation: str,
        device: str = "cpu",
        quantize: bool = False,
        integer_labels: Mapping[int, int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.device = torch.device(device)
        self._labels = list(label_names)
        # How training read integer labels ({value: class id}; empty if it read names): gold labels are read so too.
        self._integer_labels = None if integer_labels is None else dict(integer_labels)
        self._pad_id = model.embedding.padding_idx or 0
        self.model = model.to(self.device).eval()
        # The fp32 model explains; the serving model (possibly int8) predicts.
        self._serving_model = quantize_model(model) if quantize else self.model
        self.quantized = quantize

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", quantize: bool = False) -> TextClassifier:
        """Load a checkpoint saved by ``gru-nlp fit`` (read safely: no code in it runs).

        Args:
            path: the ``.ckpt`` file.
            device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
            quantize: serve with int8 dynamic quantization (CPU only; see the module docstring).

        Raises:
            FileNotFoundError: no such file.
            gru_nlp.checkpoint.CheckpointError: the file is not a usable gru-nlp checkpoint.
            ValueError: a device this machine does not have, or ``quantize=True`` with a
                non-CPU device.
        """
        if not isinstance(device, str | torch.device):
            raise TypeError(f"device must be a name such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and not quantize else "cpu"
        try:
            device_type = torch.device(device).type
        except RuntimeError as error:  # not a device name ("gpu")
            raise ValueError(f"device {device!r} is not usable here: {error}") from None
        if device_type == "meta":
            raise ValueError("device 'meta' holds no weights: choose 'cpu' or a GPU")
        if quantize and device_type != "cpu":
            raise ValueError(f"quantize=True runs on CPU only, got device={device!r}")
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:  # no such device in this torch or on this machine
            raise ValueError(f"device {device!r} is not usable here: {error}") from None
        checkpoint = load_checkpoint(path)
        model, tokenizer, labels, max_length, truncation = build_model(checkpoint, source=path)
        integer_labels = checkpoint[CHECKPOINT_KEY].get("integer_labels")  # None in checkpoints before it
        return cls(
            model, tokenizer, labels, max_length, truncation, device=device, quantize=quantize, integer_labels=integer_labels
        )

    @property
    def labels(self) -> list[str]:
        """The label names, in the order of the probability columns."""
        return list(self._labels)

    @overload
    def predict(self, texts: str, batch_size: int = 64) -> Prediction: ...

    @overload
    def predict(self, texts: list[str], batch_size: int = 64) -> list[Prediction]: ...

    def predict(self, texts: str | list[str], batch_size: int = 64) -> Prediction | list[Prediction]:
        """Classify one text or a list of texts.

        Args:
            texts: one string (returns one Prediction) or a list (returns a list, in input order).
            batch_size: texts per forward pass.

        Returns:
            Prediction or list[Prediction].

        Raises:
            TypeError: ``texts`` is neither a string nor a list of strings.
        """
        single = isinstance(texts, str)
        batch = _as_batch(texts)
        ids = self._encode(batch)
        probs = self._predict_ids(ids, batch_size)  # (N, K)
        predictions = [self._prediction(text, row, token_ids) for text, row, token_ids in zip(batch, probs, ids)]
        return predictions[0] if single else predictions

    def class_ids(self, labels: Iterable[str | int]) -> np.ndarray:
        """(N,) class ids of gold labels, to score predictions against: names, or integers.

        As training reads labels (`TextDataModule`): a string is a class name; integers are read
        as the model's training read them, which its checkpoint records (0 and 1 of IMDB's parquet
        are "neg" and "pos"). A model trained on names takes integers only when each is one of its
        names (labels 1 and 2 of classes "1" and "2"); a checkpoint from before the record reads
        them so too, else as class ids 0..K-1.

        Raises:
            ValueError: a label that is not one of this model's classes, named with its position.
        """
        if isinstance(labels, (str, bytes)):
            raise TypeError(f"labels must be a list of labels, got one {type(labels).__name__}: {labels!r:.40}")
        labels = list(labels)
        # Booleans are integers here, as training reads them (False and True: ids 0 and 1).
        numbers = all(isinstance(label, int | float | np.integer | np.floating | np.bool_) and float(label).is_integer() for label in labels)
        if numbers:  # booleans stay booleans, to be matched with classes "False" and "True" as training does
            labels = [bool(label) if isinstance(label, bool | np.bool_) else int(label) for label in labels]
            lookup = integer_label_ids(labels, self.labels, self._integer_labels)
        else:
            lookup = {name: i for i, name in enumerate(self.labels)}
        ids = []
        for position, label in enumerate(labels):
            class_id = lookup.get(label)
            if class_id is None:
                hint = "; it was trained on labels written as these names" if numbers and self._integer_labels == {} else ""
                raise ValueError(f"label {label!r} at position {position} is not one of the model's classes {self.labels}{hint}")
            ids.append(class_id)
        return np.array(ids, dtype=np.int64)

    def predict_proba(self, texts: str | list[str], batch_size: int = 64) -> np.ndarray:
        """(N, K) float32 probabilities in input order, columns in ``labels`` order (N=1 for one str)."""
        return self._predict_ids(self._encode(_as_batch(texts)), batch_size)

    def batched_outputs(self, texts: str | list[str], batch_size: int = 64) -> Iterator[tuple[list[int], ClassifierOutput]]:
        """The served model's whole output for ``texts`` (the int8 model's with ``quantize``), batch by batch:
        (the batch's positions in ``texts``, its `ClassifierOutput`). Batches hold texts of similar length,
        so they come out of input order; with an n-gram bag the output also holds each side's own scores
        (``gru_logits``, ``ngram_logits``)."""
        return self._batched_outputs(self._encode(_as_batch(texts)), batch_size)

    def explain(self, text: str, method: Method = "attention", gates: bool = False) -> Explanation:
        """Score each word of ``text`` by how much the prediction rests on it.

        Attention weights are cheap, but they are known to be an unreliable explanation on
        their own: different attention distributions can give the same prediction, and
        they often disagree with gradient-based importance (Jain & Wallace, 2019,
        "Attention is not Explanation"). That is why two gradient attributions are offered:

        * "grad_x_input": gradient of the predicted label's logit with respect to each
          token's embedding, times the embedding, summed over E. One backward pass.
        * "integrated_gradients" (Sundararajan et al., 2017): the same product,
          averaged along a straight path from an all-zero embedding (the padding
          embedding) to the text's, with 32 midpoint steps; the attributions then sum to
          about logit(text) − logit(zero input).

        A model with an n-gram bag (``ngram_buckets``) scores the text through that linear
        branch too; the gradient methods add each token's exact share of it, an n-gram's term
        split evenly between its tokens (see ``NgramBag.token_scores``), while "attention"
        shows the GRU side only.

        Args:
            text: one text.
            method: "attention", "integrated_gradients" or "grad_x_input". With mean or max
                pooling, "attention" gives the pooling's own weights (uniform, or each
                token's share of the feature maxima).
            gates: also trace the GRU's update gates per word (slow Python loop; see
                ``gru_nlp.gates``).

        Returns:
            An Explanation; see its attributes for the normalisation.
        """
        if not isinstance(text, str):  # predict takes lists; explain one text at a time
            raise TypeError(f"explain takes one text, a str, got {type(text).__name__}: call it once per text")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ids = self._encode([text])[0]
        input_ids = torch.tensor([ids], device=self.device)  # (1, T)
        lengths = torch.tensor([len(ids)], device=self.device)  # (1,)
        with torch.inference_mode():
            output = self.model(input_ids, lengths)
        probs = torch.softmax(output.logits.float(), dim=-1)[0].cpu().numpy()  # (K,)
        prediction = self._prediction(text, probs, ids)
        target = int(probs.argmax())
        if method == "attention":
            token_scores = output.attention[0].float().cpu().numpy()  # (T,)
        else:
            token_scores = self._gradient_attribution(input_ids, lengths, target, method)  # (T,)

        token_spans = self._token_spans(text, ids)
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        starts = [start for start, _ in spans]
        token_words = [_word_of(span, starts, spans) for span in token_spans]  # (T,) word index or None
        attributions = np.zeros(len(spans), dtype=np.float64)
        for word, score in zip(token_words, token_scores):
            if word is not None:
                attributions[word] += float(score)
        total = np.abs(attributions).sum()
        weights = np.abs(attributions) / total if total > 0 else np.zeros_like(attributions)
        if method == "attention":
            attributions = weights  # renormalised over the words, should a token fall outside every word

        gate_stats = None
        if gates:
            with torch.no_grad():
                trace = reference_gru(self.model.gru, self.model.embedding(input_ids), lengths)
            per_token = update_strength(trace)[:, :, 0].cpu().numpy()  # (L, D, T)
            gate_stats = np.full((*per_token.shape[:2], len(spans)), np.nan)
            for w in range(len(spans)):
                members = [t for t, word in enumerate(token_words) if word == w]
                if members:
                    gate_stats[:, :, w] = per_token[:, :, members].mean(axis=-1)

        return Explanation(
            text=text,
            words=[text[start:end] for start, end in spans],
            spans=spans,
            weights=weights,
            attributions=attributions,
            prediction=prediction,
            method=method,
            tokens=[text[start:end] if start is not None else "" for start, end in token_spans],
            token_weights=np.asarray(token_scores, dtype=np.float64),
            gates=gate_stats,
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at position {position}: {text!r:.40}")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:  # a lone surrogate: bytes that were not UTF-8, decoded leniently
                    raise ValueError(
                        f"text at position {position} is not valid Unicode ({error.reason} {text[error.start]!r} at "
                        f"character {error.start}; it often stands for a byte that was not UTF-8)"
                    ) from None
        return encode(self.tokenizer, texts, self.max_length, self.truncation)

    def _predict_ids(self, ids: list[list[int]], batch_size: int) -> np.ndarray:
        """(N,) id lists -> (N, K) probabilities in input order."""
        probs = np.zeros((len(ids), len(self._labels)), dtype=np.float32)
        for rows, output in self._batched_outputs(ids, batch_size):
            probs[rows] = torch.softmax(output.logits.float(), dim=-1).cpu().numpy()  # (B, K)
        return probs

    def _batched_outputs(self, ids: list[list[int]], batch_size: int) -> Iterator[tuple[list[int], ClassifierOutput]]:
        """Length-bucketed batched inference: (N,) id lists -> (positions in ``ids``, output) per batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of similar length pad little
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, lengths = self._pad([ids[i] for i in rows])
            with torch.inference_mode():  # only around the model: the caller's code between batches keeps its mode
                output = self._serving_model(input_ids, lengths)
            yield rows, output

    def _pad(self, sequences: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Right-pad to (B, T) ids and (B,) lengths on the classifier's device."""
        batch = collate([{"input_ids": sequence} for sequence in sequences], pad_id=self._pad_id)
        return batch["input_ids"].to(self.device), batch["lengths"].to(self.device)

    def _prediction(self, text: str, probs: np.ndarray, ids: list[int]) -> Prediction:
        best = int(probs.argmax())
        # A lone unknown token is either the placeholder for an empty encoding or one
        # unknown word; only re-tokenising tells them apart, and it is one short text.
        # Control and format characters do get tokens ([UNK]), so they are checked apart.
        empty = not _has_readable_characters(text) or (
            len(ids) == 1 and ids[0] == UNK_ID and len(self.tokenizer.encode(text, add_special_tokens=False)) == 0
        )
        return Prediction(
            text=text,
            label=self._labels[best],
            score=float(probs[best]),
            probs={label: float(p) for label, p in zip(self._labels, probs)},
            num_tokens=len(ids),
            empty=empty,
        )

    def _gradient_attribution(self, input_ids: Tensor, lengths: Tensor, target: int, method: Method) -> np.ndarray:
        """(1, T) ids -> (T,) signed attributions to the target logit (see ``explain``)."""
        with torch.no_grad():
            embedded = self.model.embedding(input_ids)  # (1, T, E)
        if method == "grad_x_input":
            scales = torch.ones(1, 1, 1, device=self.device)  # (S=1, 1, 1)
        else:
            steps = INTEGRATED_GRADIENTS_STEPS
            scales = ((torch.arange(steps, device=self.device) + 0.5) / steps)[:, None, None]  # (S, 1, 1)
        path = (scales * embedded).requires_grad_(True)  # (S, T, E)
        # cuDNN's RNN backward runs in training mode only; the eval-mode GRU here needs the native kernel.
        # The switch is process-wide while it lasts (other threads' CUDA forwards run without cuDNN
        # meanwhile), so it is made on CUDA only.
        no_cudnn = torch.backends.cudnn.flags(enabled=False) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.enable_grad(), no_cudnn:
            logits = self.model(input_ids.expand(len(scales), -1), lengths.expand(len(scales)), embedded=path).logits  # (S, K)
            (gradients,) = torch.autograd.grad(logits[:, target].sum(), path)  # (S, T, E)
        # Zero embedding is the baseline, so (x - baseline) is x itself.
        scores = (gradients.mean(dim=0) * embedded[0]).sum(dim=-1)  # (T,)
        if self.model.ngrams is not None:
            # The n-gram bag never sees the embeddings; its logit splits exactly over the tokens.
            with torch.no_grad():
                mask = torch.ones_like(input_ids, dtype=torch.bool)  # (1, T): one text, no padding
                shares = self.model.ngrams.token_scores(input_ids, mask, target)[0]  # (T,)
                scores = scores + self.model.side_weights[1] * shares  # as weighted in the served logits
        return scores.float().cpu().numpy()  # (T,)

    def _token_spans(self, text: str, ids: list[int]) -> list[tuple[int | None, int | None]]:
        """Each kept token's (start, end) in ``text``; (None, None) for tokens from no characters.

        ``encode`` returns ids only, so the kept tokens are found in the full encoding by the
        truncation policy itself (matching ids instead can pick the wrong cut when a token repeats).
        """
        full: Encoding = self.tokenizer.encode(text, add_special_tokens=False)
        positions: list[int | None] = kept_positions(len(full.ids), self.max_length, self.truncation)
        if [full.ids[position] for position in positions] != ids:  # the placeholder of a text without tokens
            positions = [None] * len(ids)
        spans: list[tuple[int | None, int | None]] = []
        for position in positions:
            start, end = full.offsets[position] if position is not None else (0, 0)
            spans.append((start, end) if end > start else (None, None))
        return spans


def _as_batch(texts: str | Iterable[str]) -> list[str]:
    """``texts`` as a list: one string becomes a list of one."""
    if isinstance(texts, str):
        return [texts]
    # bytes are iterable (of ints), but never text; a mapping or a DataFrame iterates over its keys.
    if isinstance(texts, (bytes, bytearray, Mapping)) or not isinstance(texts, Iterable) or hasattr(texts, "columns"):
        hint = ": pass its text column, e.g. frame['text']" if hasattr(texts, "columns") else ""
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}{hint}")
    return list(texts)


def _has_readable_characters(text: str) -> bool:
    """Whether ``text`` holds a character other than whitespace, control (Cc) and format (Cf) ones."""
    return any(not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf") for char in text)


def _word_of(span: tuple[int | None, int | None], starts: list[int], spans: list[tuple[int, int]]) -> int | None:
    """Index of the whitespace-delimited word holding a token's first character, if any."""
    start = span[0]
    if start is None:
        return None
    # The last word starting at or before the token; it holds the token if it ends after it.
    word = bisect.bisect_right(starts, start) - 1
    return word if word >= 0 and start < spans[word][1] else None


class Int8GRU(nn.Module):
    """A ``PaddingSafeGRU``'s weights served by int8 dynamic ``nn.GRU`` layers.

    ``quantize_dynamic`` only swaps ``nn.GRU`` (and ``nn.Linear``) modules, so each layer
    and direction becomes a one-layer ``nn.GRU`` holding the same weights, run with the
    same padding scheme: the forward direction reads right-padded rows as they are, the
    backward direction reads each row reversed within its length.
    """

    def __init__(self, gru: PaddingSafeGRU) -> None:
        super().__init__()
        self.bidirectional = gru.bidirectional
        self.layers = nn.ModuleList()
        for layer in range(gru.num_layers):
            directions = nn.ModuleList()
            for reverse in [False, True][: gru.num_directions]:
                w_ih, w_hh, b_ih, b_hh = gru.layer_weights(layer, reverse)
                cell = nn.GRU(w_ih.size(1), gru.hidden_size, num_layers=1, batch_first=True)
                cell.load_state_dict({"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh})
                directions.append(cell)
            self.layers.append(directions)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, E) right-padded inputs, (B,) lengths -> (B, T, D*H), zero past each length."""
        mask = torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]  # (B, T)
        hidden = x
        for directions in self.layers:
            outputs = [directions[0](hidden)[0]]  # [(B, T, H)]
            if self.bidirectional:
                backward = directions[1](reverse_within_lengths(hidden, lengths))[0]  # (B, T, H)
                outputs.append(reverse_within_lengths(backward, lengths))
            hidden = torch.cat(outputs, dim=-1)  # (B, T, D*H)
        return hidden * mask[..., None]


def quantize_model(model: BiGRUClassifier) -> nn.Module:
    """An int8 dynamic-quantized copy for CPU serving; ``model`` itself is left fp32."""
    serving = copy.deepcopy(model).cpu().eval()
    serving.gru = Int8GRU(serving.gru)
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it will move to torchao; it still works here.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(serving, {nn.Linear, nn.GRU}, dtype=torch.qint8)
