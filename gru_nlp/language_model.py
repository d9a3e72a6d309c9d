"""Pretraining the classifier's encoder as a language model, in plain PyTorch.

Shape legend: B batch, T padded length, V vocabulary size, E embedding dim, H hidden size
per direction, N predicted positions.

    input_ids (B, T) -> embedding (B, T, E) -> one bidirectional PaddingSafeGRU layer (B, T, 2H)
      left-to-right state at t  -> sampled softmax over V -> token t+1
      right-to-left state at t  -> sampled softmax over V -> token t-1

This is the bidirectional language model of ELMo (Peters et al. 2018) cut to one layer:
a second stacked layer would read both directions of the first, so its left-to-right
state at t would already have seen token t+1. `BiGRUClassifier` then starts from the
embedding and first GRU layer (`encoder_weights`; the file is `gru_nlp/encoder.py`'s); its
upper layers, pooling and head start fresh.

The softmax over V tokens is estimated in training from each target and a few hundred
tokens drawn for the whole batch (`SampledSoftmax`): the full softmax costs V x H
multiply-adds per prediction, two predictions per token, several times the GRU layer's work;
torch's `nn.AdaptiveLogSoftmaxWithLoss` ran at about half this one's speed in a trial here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gru_nlp.gru import PaddingSafeGRU

class SampledSoftmax(nn.Module):
    """Softmax cross-entropy over C classes, estimated in training from a sample of classes.

    In training, `num_sampled` classes are drawn (with replacement) for the whole batch
    from the counts given to `set_class_counts`, raised to 0.75 as in word2vec. Each row's
    softmax covers its target and the samples, each sample's logit minus the log of how
    often its class is expected among them, so that the samples' exponentials sum, on
    average, to those of all other classes: the loss approaches the full softmax's as the
    sample grows (the importance sampling of Jean et al. 2015, without the target among the
    samples). A sample equal to a row's target is left out of that row. Outside training
    the loss is the exact one.
    """

    def __init__(self, in_features: int, num_classes: int, num_sampled: int = 512) -> None:
        super().__init__()
        self.num_sampled = num_sampled
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).normal_(std=in_features**-0.5))  # (C, H)
        self.bias = nn.Parameter(torch.zeros(num_classes))  # (C,)
        self.register_buffer("sampling_weights", torch.ones(num_classes))  # (C,), unnormalised

    def set_class_counts(self, counts: Tensor) -> None:
        """Sample classes in proportion to (counts + 1) ** 0.75: (C,) counts on the training data."""
        self.sampling_weights.copy_((counts.float() + 1) ** 0.75)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(N, H) inputs, (N,) target classes -> the mean cross-entropy, a scalar."""
        # fp32 under autocast: bf16 matmuls are slow on CPUs without AMX, and the logits are subtracted and exponentiated
        with torch.autocast(inputs.device.type, enabled=False):
            return self._loss(inputs.float(), targets)

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        if not self.training:
            # Exact, a few thousand rows at a time so the (rows, C) logits stay small.
            total = sum(
                F.cross_entropy(F.linear(rows, self.weight, self.bias), classes, reduction="sum")
                for rows, classes in zip(inputs.split(2048), targets.split(2048))
            )
            return total / targets.numel()
        probs = self.sampling_weights / self.sampling_weights.sum()  # (C,)
        sampled = torch.multinomial(probs, self.num_sampled, replacement=True)  # (S,)
        log_expected = torch.log(self.num_sampled * probs)  # (C,): log of each class's expected count in the sample
        target_logits = (inputs * self.weight[targets]).sum(-1) + self.bias[targets]  # (N,)
        sampled_logits = F.linear(inputs, self.weight[sampled], self.bias[sampled] - log_expected[sampled])  # (N, S)
        sampled_logits.masked_fill_(sampled[None, :] == targets[:, None], float("-inf"))
        # -log softmax of the target among [target, samples], without building the (N, 1 + S) logits
        return (torch.logaddexp(target_logits, sampled_logits.logsumexp(dim=1)) - target_logits).mean()


class BiGRULanguageModel(nn.Module):
    """Embedding -> bidirectional GRU layer -> next-token and previous-token prediction.

    Args:
        vocab_size: V, the tokenizer's vocabulary size.
        embedding_dim: E, as the classifier will use.
        hidden_size: H per direction, as the classifier will use.
        pad_id: the padding token id; its embedding stays zero.
        dropout: on the embeddings and on the states before the softmax.
        num_sampled: tokens drawn per training batch for `SampledSoftmax`.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 128,
        hidden_size: int = 128,
        pad_id: int = 0,
        dropout: float = 0.0,
        num_sampled: int = 512,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.gru = PaddingSafeGRU(embedding_dim, hidden_size, num_layers=1, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.softmax = SampledSoftmax(hidden_size, vocab_size, num_sampled)

    def set_token_counts(self, counts: Tensor) -> None:
        """(V,) token counts on the training texts, which the softmax samples by."""
        self.softmax.set_class_counts(counts)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Mean negative log-likelihood of every token a direction can predict.

        Args:
            input_ids: (B, T) token ids, padded on the right.
            lengths: (B,) real tokens per row, each in [1, T].

        Returns:
            The loss, a scalar: nats per predicted token, over N = 2 * sum(lengths - 1) predictions.
        """
        hidden = self.gru.hidden_size
        lengths = lengths.to(input_ids.device)
        states = self.gru(self.dropout(self.embedding(input_ids)), lengths)  # (B, T, 2H)
        follows = torch.arange(1, input_ids.size(1), device=input_ids.device) < lengths[:, None]  # (B, T-1): t+1 is real
        # The left-to-right state at t has read tokens 0..t and predicts t+1; the
        # right-to-left state at t+1 has read tokens t+1..end and predicts t.
        predictors = torch.cat([states[:, :-1, :hidden][follows], states[:, 1:, hidden:][follows]])  # (N, H)
        predicted = torch.cat([input_ids[:, 1:][follows], input_ids[:, :-1][follows]])  # (N,)
        if predicted.numel() == 0:  # every text one token long: nothing to predict
            # A zero that still reaches every parameter, as DDP expects of each step.
            return sum(parameter.sum() for parameter in self.parameters()) * 0
        return self.softmax(self.dropout(predictors), predicted)

    def encoder_weights(self) -> dict[str, Tensor]:
        """The embedding and GRU weights, under the names `BiGRUClassifier` gives them."""
        weights = {"embedding.weight": self.embedding.weight}
        weights |= {f"gru.{name}": value for name, value in self.gru.named_parameters()}
        return {name: value.detach().cpu().clone() for name, value in weights.items()}
