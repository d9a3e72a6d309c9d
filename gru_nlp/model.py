"""The BiGRU text classifier, in plain PyTorch.

Shape legend: B batch, T padded length, V vocabulary size, E embedding dim,
H hidden size per direction, D directions (1 or 2), K classes.

    input_ids (B, T) -> embedding (B, T, E) -> PaddingSafeGRU (B, T, D*H)
      -> pooling over the real tokens (B, P) -> dropout -> linear (B, K)
      [+ NgramBag(input_ids) (B, K), when ngram_buckets > 0; outside training the two
       sides are weighted by `side_weights`, fitted on validation data by `fit_side_weights`]

P is D*H, or 2*D*H for "attention_max" pooling (attention and max pooling side by side).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gru_nlp.gru import PaddingSafeGRU

Pooling = Literal["attention", "mean", "max", "attention_max"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
NgramFeatures = Literal["mean", "naive_bayes"]
NGRAM_FEATURES: tuple[str, ...] = get_args(NgramFeatures)


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(B,) lengths -> (B, T) bool mask, True on real tokens."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class SettingError(ValueError):
    """A model or training setting outside its range; the message names the setting."""


_SETTING_RULES = {
    "count": (lambda value: value >= 1, "at least 1"),
    "positive": (lambda value: value > 0, "above 0"),
    "non_negative": (lambda value: value >= 0, "0 or more"),
    "fraction": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "ratio": (lambda value: 0 <= value <= 1, "in [0, 1]"),
}


def check_settings(rule: Literal["count", "positive", "non_negative", "fraction", "ratio"], **settings: float) -> None:
    """Raise `SettingError` naming the first setting that breaks `rule` (NaN breaks every rule)."""
    holds, wanted = _SETTING_RULES[rule]
    for name, value in settings.items():
        if not holds(value):
            raise SettingError(f"{name} must be {wanted}, got {value}")


class AttentionPooling(nn.Module):
    """Additive attention (Bahdanau-style) pooling over the real tokens of a sequence.

    score_t = v^T tanh(W h_t + b); weights = softmax over t of the scores, with padding
    scored at the dtype's minimum so it gets exactly zero weight.
    """

    def __init__(self, input_dim: int, attention_dim: int | None = None) -> None:
        super().__init__()
        attention_dim = attention_dim or input_dim
        self.project = nn.Linear(input_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool states into one vector.

        Args:
            states: (B, T, C) per-token states.
            mask: (B, T) True on real tokens; every row has at least one.

        Returns:
            pooled (B, C) and weights (B, T) that sum to 1 over the real tokens.
        """
        scores = self.score(torch.tanh(self.project(states))).squeeze(-1)  # (B, T)
        # Fill padding with the dtype's minimum, not -inf: a fully masked row would give NaN.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1)  # (B, T)
        pooled = torch.bmm(weights.to(states.dtype).unsqueeze(1), states).squeeze(1)  # (B, C)
        return pooled, weights


def mean_pool(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Average of the real tokens; weights are uniform over them."""
    weights = mask.float() / mask.sum(dim=1, keepdim=True)  # (B, T)
    pooled = torch.bmm(weights.to(states.dtype).unsqueeze(1), states).squeeze(1)  # (B, C)
    return pooled, weights


def max_pool(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Feature-wise maximum over the real tokens; a token's weight is its share of the maxima."""
    pooled, winners = _masked_max(states, mask)  # (B, C), (B, C)
    counts = torch.zeros(mask.shape, device=states.device).scatter_add_(
        1, winners, torch.ones(winners.shape, device=states.device)
    )  # (B, T)
    return pooled, counts / states.size(-1)


def _masked_max(states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, C) states, (B, T) mask -> (B, C) maxima over the real tokens and their (B, C) positions."""
    return states.masked_fill(~mask[..., None], torch.finfo(states.dtype).min).max(dim=1)


class NgramBag(nn.Module):
    """A linear bag of n-grams whose class scores are added to the GRU's logits.

    Each unigram and hashed n-gram (bigram, trigram, ... up to `order`) has one learned
    weight per class. Longer n-grams hash into `buckets` shared slots, so memory stays
    fixed whatever the vocabulary. The weights start at zero: the bag adds nothing until
    trained. Two ways to turn a text's n-grams into class scores:

    - "mean" (fastText-style): the mean weight over the text's n-gram occurrences, a
      logistic regression on n-gram frequencies.
    - "naive_bayes" (NBSVM, Wang & Manning 2012): each distinct n-gram counts once, scaled
      per class by its Naive Bayes log-count ratio, and the terms are summed. The ratios are
      counted on the training set (`count_texts`, then `set_log_count_ratios`) before
      training, and saved with the model; until then they are zero and so is the bag.

    Args:
        vocab_size: V; unigram ids are the token ids themselves.
        buckets: hashed slots for the n-grams longer than one token, after the V unigram slots.
        num_classes: K.
        pad_id: the padding token id; it never counts as an n-gram.
        order: the longest n-gram, >= 1.
        features: "mean" or "naive_bayes", as above.
    """

    # A prime multiplier spreads token sequences over the buckets.
    HASH_PRIME = 1_000_003

    def __init__(
        self,
        vocab_size: int,
        buckets: int,
        num_classes: int,
        pad_id: int = 0,
        order: int = 2,
        features: NgramFeatures = "mean",
    ) -> None:
        super().__init__()
        if order < 1:
            raise SettingError(f"the n-gram order must be >= 1; got {order}")
        if features not in NGRAM_FEATURES:
            raise SettingError(f"n-gram features must be one of {', '.join(NGRAM_FEATURES)}; got {features!r}")
        self.vocab_size = vocab_size
        self.buckets = buckets
        self.pad_id = pad_id
        self.order = order
        self.features = features
        self.weight = nn.Embedding(vocab_size + buckets, num_classes, padding_idx=pad_id)
        nn.init.zeros_(self.weight.weight)
        if features == "naive_bayes":
            self.register_buffer("log_count_ratios", torch.zeros(vocab_size + buckets, num_classes))

    def ngram_ids(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids, (B, T) mask -> (B, N) unigram ids, then bigram ids, ...; pad_id where there is none.

        N = T + (T-1) + ... + (T-order+1). An n-gram is real where its last token is. With
        "naive_bayes" features a row's repeats are pad_id too: only first occurrences count.
        """
        ids, real = [input_ids], [mask]
        hashes = input_ids  # (B, T-n+1) for the n-grams of the current order n
        for n in range(2, self.order + 1):
            hashes = (hashes[:, :-1] * self.HASH_PRIME + input_ids[:, n - 1 :]) % self.buckets  # (B, T-n+1)
            ids.append(self.vocab_size + hashes)
            real.append(mask[:, n - 1 :])
        ngrams = torch.cat(ids, dim=1).masked_fill(~torch.cat(real, dim=1), self.pad_id)  # (B, N)
        if self.features == "naive_bayes":
            ngrams = ngrams.masked_fill(_repeats(ngrams), self.pad_id)
        return ngrams

    def _terms(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids, (B, T) mask -> (B, N, K): each n-gram's term of the class scores."""
        ngrams = self.ngram_ids(input_ids, mask)  # (B, N)
        weights = self.weight(ngrams)  # (B, N, K); pad_id's row is zero
        if self.features == "naive_bayes":
            return weights * self.log_count_ratios[ngrams]  # (B, N, K)
        counts = (ngrams != self.pad_id).sum(dim=1, keepdim=True)  # (B, 1), >= 1
        return weights / counts[..., None]  # (B, N, K)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids, (B, T) mask -> (B, K) class scores: the sum of the n-gram terms."""
        return self._terms(input_ids, mask).sum(dim=1)  # (B, K)

    def token_scores(self, input_ids: Tensor, mask: Tensor, target: int) -> Tensor:
        """(B, T) -> (B, T): each token's exact share of the `target` class score.

        An n-gram's term is split evenly between its n tokens, so the shares sum to
        `forward(...)[:, target]`.
        """
        terms = self._terms(input_ids, mask)[..., target]  # (B, N)
        length = input_ids.size(1)
        shares = torch.zeros_like(input_ids, dtype=terms.dtype)  # (B, T)
        start = 0
        for n in range(1, min(self.order, length) + 1):  # a text shorter than the order has no longer n-grams
            count = length - n + 1
            ngram_terms = terms[:, start : start + count] / n  # (B, T-n+1); the n-gram starting at t
            for offset in range(n):  # ... covers tokens t .. t+n-1
                shares = shares + F.pad(ngram_terms, (offset, length - count - offset))
            start += count
        return shares

    @torch.no_grad()
    def count_texts(self, batches: Iterable[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """Count, per n-gram slot and class, the texts that contain the n-gram.

        Args:
            batches: (input_ids (B, T), lengths (B,), labels (B,)) of the training texts.

        Returns:
            (V + buckets, K) counts, to sum over processes and pass to `set_log_count_ratios`.
        """
        self._check_naive_bayes("count texts")
        counts = torch.zeros_like(self.weight.weight)  # (V + buckets, K)
        for input_ids, lengths, labels in batches:
            input_ids, labels = input_ids.to(counts.device), labels.to(counts.device)
            mask = lengths_to_mask(lengths.to(counts.device), input_ids.size(1))  # (B, T)
            ngrams = self.ngram_ids(input_ids, mask)  # (B, N), each n-gram once per row
            classes = F.one_hot(labels, counts.size(1)).to(counts.dtype)  # (B, K)
            counts.index_add_(0, ngrams.flatten(), classes.repeat_interleave(ngrams.size(1), dim=0))
        counts[self.pad_id] = 0
        return counts

    @torch.no_grad()
    def set_log_count_ratios(self, counts: Tensor, smoothing: float = 1.0) -> None:
        """Set the "naive_bayes" scaling from `count_texts`' (V + buckets, K) counts.

        For class k, r_k = log(p_k / |p_k|_1) - log(q_k / |q_k|_1), where p_k counts the
        texts of class k that contain each n-gram and q_k those of the other classes, each
        plus `smoothing`. With two classes r_0 = -r_1: the log-count ratio of NBSVM.
        """
        self._check_naive_bayes("set log-count ratios")
        in_class = counts + smoothing  # (V + buckets, K)
        out_class = counts.sum(dim=1, keepdim=True) - counts + smoothing  # (V + buckets, K)
        ratios = (in_class / in_class.sum(dim=0)).log() - (out_class / out_class.sum(dim=0)).log()
        ratios[self.pad_id] = 0
        self.log_count_ratios.copy_(ratios)

    def _check_naive_bayes(self, action: str) -> None:
        if self.features != "naive_bayes":
            raise ValueError(f"only a bag with 'naive_bayes' features can {action}; this bag's are {self.features!r}")

    @property
    def needs_counts(self) -> bool:
        """True for "naive_bayes" features whose ratios have not been set yet."""
        return self.features == "naive_bayes" and not bool(self.log_count_ratios.any())


def _repeats(ids: Tensor) -> Tensor:
    """(B, N) -> (B, N) bool: True where the id already occurred earlier in its row."""
    sorted_ids, positions = ids.sort(dim=1, stable=True)  # equal ids keep their row order
    repeat = torch.zeros_like(ids, dtype=torch.bool)  # (B, N), in sorted order
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.zeros_like(repeat).scatter_(1, positions, repeat)


def adversarial_perturbation(gradient: Tensor, embedded: Tensor, mask: Tensor, norm: float) -> Tensor:
    """The step along the loss's gradient that adversarial training adds to the embeddings (Miyato et al. 2017).

    r = norm * s * g / |g|_2 per text, the L2 norm taken over all of the text's (T, E) entries, where
    s is the root-mean-square entry of the batch's real token embeddings. The paper normalises each
    embedding dimension to unit variance, so that the embeddings cannot grow away from a perturbation
    of fixed size, and uses norm 5 on IMDB; measuring the norm in units of s does the same here. A
    text whose gradient is zero is left alone.

    Args:
        gradient: (B, T, E) d loss / d embeddings.
        embedded: (B, T, E) the embeddings the gradient was taken at.
        mask: (B, T) True on real tokens.
        norm: the perturbation's L2 norm per text, in units of s.

    Returns:
        (B, T, E) the perturbation, zero on padding, with no gradient of its own.
    """
    gradient = gradient.detach() * mask[..., None]  # (B, T, E)
    scale = embedded.detach()[mask].float().square().mean().sqrt()  # s, a scalar
    norms = gradient.flatten(1).float().norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (B,)
    return (norm * scale / norms)[:, None, None].to(gradient.dtype) * gradient  # (B, T, E)


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (B, K), as served
    attention: Tensor  # (B, T), sums to 1 over the real tokens
    gru_logits: Tensor | None = None  # (B, K): the GRU side's own scores, if the model has an n-gram bag
    ngram_logits: Tensor | None = None  # (B, K): the n-gram bag's own scores, if the model has one


def fit_side_weights(
    gru_logits: Tensor, ngram_logits: Tensor, labels: Tensor, max_iter: int = 100, penalty: float = 1e-5
) -> Tensor:
    """The weights (w_gru, w_ngram) that minimise the cross-entropy of w_gru * gru + w_ngram * ngram.

    Temperature scaling (Guo et al. 2017) with one temperature per side: two numbers fitted
    on held-out data, so they can only rescale the sides, not learn the data. They are fitted
    as logarithms, so they stay positive: a side that misleads on held-out data is turned
    down towards zero, never inverted. A small penalty on the logarithms (``penalty * |log w|^2``)
    keeps them finite where the held-out data is separable, whose cross-entropy keeps falling as
    the weights grow (unpenalised, L-BFGS took them to 4e7, or overflowed its line search).

    Args:
        gru_logits: (N, K) the GRU side's scores.
        ngram_logits: (N, K) the n-gram bag's scores.
        labels: (N,) class ids.

    Returns:
        (2,) float32 weights, starting from (1, 1); (1, 1) if the fit is not finite (NaN scores).
    """
    # Lightning validates under inference mode, whose tensors autograd cannot record: clone out of it.
    with torch.inference_mode(False), torch.enable_grad():
        sides = torch.stack([gru_logits, ngram_logits]).double().clone()  # (2, N, K); float64: no overflow mid-search
        labels = labels.clone()
        log_weights = torch.zeros(2, dtype=torch.float64, device=sides.device, requires_grad=True)  # (2,)
        optimizer = torch.optim.LBFGS([log_weights], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            weighted = (log_weights.exp()[:, None, None] * sides).sum(dim=0)  # (N, K)
            loss = F.cross_entropy(weighted, labels)
            loss = loss + penalty * log_weights.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    weights = log_weights.detach().exp().float()
    return weights if torch.isfinite(weights).all() else torch.ones_like(weights)


class BiGRUClassifier(nn.Module):
    """Embedding -> stacked bidirectional GRU -> masked pooling -> linear classifier.

    Args:
        vocab_size: V, the tokenizer's vocabulary size.
        num_classes: K, the number of labels.
        embedding_dim: E.
        hidden_size: H, per direction.
        num_layers: stacked GRU layers.
        bidirectional: read right-to-left too (doubles the pooled size).
        dropout: between GRU layers and before the classifier.
        embedding_dropout: probability of dropping a whole token's embedding in training
            (word dropout), which regularises more than dropping single features.
        recurrent_dropout: DropConnect on the GRU's hidden-to-hidden weights in training.
        pooling: "attention" (additive), "mean", "max", or "attention_max": the
            attention-pooled and the max-pooled vectors concatenated, so the classifier
            sees both a weighted summary and the strongest evidence per feature; its
            explanation weights are the attention's.
        pad_id: the padding token id; its embedding stays zero.
        ngram_buckets: if > 0, add a linear bag of unigrams and this many hashed slots for
            longer n-grams (`NgramBag`) to the logits: a wide-and-deep model whose n-gram
            side picks up local phrases the recurrent side is slow to learn. 0 turns it off.
        ngram_order: the bag's longest n-gram (2: unigrams and bigrams).
        ngram_features: "mean" or "naive_bayes" (see `NgramBag`).

    With an n-gram bag, training learns the plain sum of the two sides' scores; outside
    training they are weighted by the buffer `side_weights` (w_gru, w_ngram), (1, 1) until
    set from `fit_side_weights` on validation data. The GRU's scores are larger and more
    confident than the bag's, and on IMDB the plain sum scored below the bag alone (README).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embedding_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = True,
        dropout: float = 0.3,
        embedding_dropout: float = 0.1,
        pooling: Pooling = "attention",
        pad_id: int = 0,
        recurrent_dropout: float = 0.0,
        ngram_buckets: int = 0,
        ngram_order: int = 2,
        ngram_features: NgramFeatures = "mean",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise SettingError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if ngram_buckets < 0:
            raise SettingError(f"ngram_buckets must be >= 0 (0 turns the n-gram bag off); got {ngram_buckets}")
        check_settings(
            "count",
            vocab_size=vocab_size,
            num_classes=num_classes,
            embedding_dim=embedding_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
        )
        check_settings("fraction", dropout=dropout, embedding_dropout=embedding_dropout, recurrent_dropout=recurrent_dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.embedding_dropout = embedding_dropout
        self.gru = PaddingSafeGRU(embedding_dim, hidden_size, num_layers, bidirectional, dropout, recurrent_dropout)
        output_dim = hidden_size * (2 if bidirectional else 1)
        self.attention = AttentionPooling(output_dim) if pooling in ("attention", "attention_max") else None
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        pooled_dim = output_dim * (2 if pooling == "attention_max" else 1)
        self.classifier = nn.Linear(pooled_dim, num_classes)
        self.ngrams = None
        if ngram_buckets:
            self.ngrams = NgramBag(vocab_size, ngram_buckets, num_classes, pad_id, ngram_order, ngram_features)
            self.register_buffer("side_weights", torch.ones(2))  # (w_gru, w_ngram)

    def forward(self, input_ids: Tensor, lengths: Tensor, embedded: Tensor | None = None) -> ClassifierOutput:
        """Classify a right-padded batch.

        Args:
            input_ids: (B, T) token ids, padded on the right.
            lengths: (B,) number of real tokens per row, each in [1, T].
            embedded: (B, T, E) vectors for the GRU to read as they are, instead of ``embed(input_ids)``
                (gradient explanations pass scaled embeddings, adversarial training perturbed ones;
                no word dropout is applied to them); ``input_ids`` still feed the n-gram bag.

        Returns:
            ClassifierOutput with logits (B, K) and attention (B, T); with the n-gram bag also
            each side's own scores, gru_logits and ngram_logits (B, K).
        """
        mask = lengths_to_mask(lengths.to(input_ids.device), input_ids.size(1))  # (B, T)
        if embedded is None:
            embedded = self.embed(input_ids)  # (B, T, E)
        states = self.gru(embedded, lengths)  # (B, T, D*H)
        pooled, weights = self.pool(states, mask)  # (B, P), (B, T)
        logits = self.classifier(self.dropout(pooled))  # (B, K)
        if self.ngrams is None:
            return ClassifierOutput(logits, weights)
        ngram_logits = self.ngrams(input_ids, mask)  # (B, K)
        if self.training:
            combined = logits + ngram_logits  # (B, K)
        else:
            combined = self.side_weights[0] * logits + self.side_weights[1] * ngram_logits  # (B, K)
        return ClassifierOutput(combined, weights, logits, ngram_logits)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, E): the vectors the GRU reads, whole tokens dropped in training (word dropout)."""
        embedded = self.embedding(input_ids)  # (B, T, E)
        if self.training and self.embedding_dropout > 0:
            keep = torch.rand(embedded.shape[:2], device=embedded.device) >= self.embedding_dropout  # (B, T)
            embedded = embedded * keep[..., None] / (1 - self.embedding_dropout)
        return embedded

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints from before side weights existed served the plain sum.
        if self.ngrams is not None:
            state_dict.setdefault(prefix + "side_weights", torch.ones(2))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def pool(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, D*H) states, (B, T) mask -> (B, P) pooled vector and (B, T) token weights."""
        if self.pooling == "mean":
            return mean_pool(states, mask)
        if self.pooling == "max":
            return max_pool(states, mask)
        pooled, weights = self.attention(states, mask)  # (B, D*H), (B, T)
        if self.pooling == "attention_max":
            pooled = torch.cat([pooled, _masked_max(states, mask)[0]], dim=-1)  # (B, 2*D*H)
        return pooled, weights
