"""BiGRUClassifier: shapes, padding invariance, pooling, and that it can learn."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gru_nlp.model import BiGRUClassifier, NgramBag, SettingError, fit_side_weights, lengths_to_mask

# Odd, all-different sizes so a swapped dimension cannot pass by accident.
B, T, V, E, H, K = 3, 7, 50, 8, 6, 5


def make_model(**overrides) -> BiGRUClassifier:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=V, num_classes=K, embedding_dim=E, hidden_size=H, num_layers=2, dropout=0.2)
    return BiGRUClassifier(**(kwargs | overrides)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([T, 4, 1])
    input_ids = torch.randint(1, V, (B, T), generator=generator)
    input_ids[lengths_to_mask(lengths, T).logical_not()] = 0
    return input_ids, lengths


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("pooling", ["attention", "mean", "max", "attention_max"])
def test_output_shapes(bidirectional, pooling):
    model = make_model(bidirectional=bidirectional, pooling=pooling)
    input_ids, lengths = padded_batch()
    output = model(input_ids, lengths)
    assert output.logits.shape == (B, K)
    assert output.attention.shape == (B, T)
    assert model.gru(model.embedding(input_ids), lengths).shape == (B, T, H * (2 if bidirectional else 1))


@pytest.mark.parametrize("pooling", ["attention", "mean", "max", "attention_max"])
def test_weights_sum_to_one_over_real_tokens_and_zero_on_padding(pooling):
    model = make_model(pooling=pooling)
    input_ids, lengths = padded_batch()
    weights = model(input_ids, lengths).attention
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(B))
    assert torch.all(weights[~lengths_to_mask(lengths, T)] == 0)


@pytest.mark.parametrize("pooling", ["attention", "mean", "max", "attention_max"])
def test_a_text_alone_and_inside_a_padded_batch_give_the_same_logits(pooling):
    model = make_model(pooling=pooling)
    input_ids, lengths = padded_batch()
    batched = model(input_ids, lengths)
    for row in range(B):
        n = int(lengths[row])
        alone = model(input_ids[row : row + 1, :n], lengths[row : row + 1])
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone.attention[0], batched.attention[row, :n], atol=1e-5, rtol=0)


def test_padding_content_cannot_change_a_prediction():
    model = make_model()
    input_ids, lengths = padded_batch()
    noisy = input_ids.clone()
    noisy[~lengths_to_mask(lengths, T)] = 7  # garbage where padding should be
    torch.testing.assert_close(model(input_ids, lengths).logits, model(noisy, lengths).logits, atol=1e-6, rtol=0)


def test_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        make_model(pooling="sum")


def test_fits_a_tiny_separable_dataset():
    torch.manual_seed(0)
    # Class = which of three marker tokens appears somewhere in a random-length sequence.
    n, num_classes = 48, 3
    lengths = torch.randint(2, 12, (n,))
    input_ids = torch.randint(10, 40, (n, 12)) * lengths_to_mask(lengths, 12)
    labels = torch.arange(n) % num_classes
    positions = (torch.rand(n) * lengths).long()
    input_ids[torch.arange(n), positions] = labels + 1
    model = BiGRUClassifier(vocab_size=40, num_classes=num_classes, embedding_dim=16, hidden_size=16, num_layers=1, dropout=0.0, embedding_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(input_ids, lengths).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    accuracy = (model(input_ids, lengths).logits.argmax(-1) == labels).float().mean()
    assert accuracy == 1.0


def test_embedding_dropout_drops_whole_tokens_only_in_training():
    model = make_model(embedding_dropout=0.5)
    input_ids, lengths = padded_batch()
    model.eval()
    first = model(input_ids, lengths).logits
    torch.testing.assert_close(first, model(input_ids, lengths).logits)
    model.train()
    torch.manual_seed(3)
    assert not torch.allclose(model(input_ids, lengths).logits, first)


def test_ngram_bag_scores_are_the_mean_weight_of_unigrams_and_hashed_bigrams():
    bag = NgramBag(vocab_size=10, buckets=7, num_classes=2)
    input_ids = torch.tensor([[3, 4, 3, 0], [5, 0, 0, 0]])
    mask = lengths_to_mask(torch.tensor([3, 1]), 4)
    bigram_34 = 10 + (3 * NgramBag.HASH_PRIME + 4) % 7
    bigram_43 = 10 + (4 * NgramBag.HASH_PRIME + 3) % 7
    assert bag.ngram_ids(input_ids, mask).tolist() == [[3, 4, 3, 0, bigram_34, bigram_43, 0], [5, 0, 0, 0, 0, 0, 0]]
    with torch.no_grad():
        bag.weight.weight.copy_(torch.arange(34.0).view(17, 2))
        bag.weight.weight[0] = 0  # padding_idx: the row that stays zero in training
    expected_first = (2 * bag.weight.weight[3] + bag.weight.weight[4] + bag.weight.weight[bigram_34] + bag.weight.weight[bigram_43]) / 5
    torch.testing.assert_close(bag(input_ids, mask), torch.stack([expected_first, bag.weight.weight[5]]))


def test_ngram_bag_starts_silent_and_keeps_padding_invariance():
    plain, wide = make_model(), make_model(ngram_buckets=11)
    input_ids, lengths = padded_batch()
    torch.testing.assert_close(wide(input_ids, lengths).logits, plain(input_ids, lengths).logits, rtol=0, atol=0)
    with torch.no_grad():
        wide.ngrams.weight.weight.normal_()
        wide.ngrams.weight.weight[0] = 0  # padding_idx: the row that stays zero in training
    noisy = input_ids.clone()
    noisy[~lengths_to_mask(lengths, T)] = 7
    torch.testing.assert_close(wide(input_ids, lengths).logits, wide(noisy, lengths).logits, atol=1e-6, rtol=0)
    assert not torch.allclose(wide(input_ids, lengths).logits, plain(input_ids, lengths).logits)


def test_naive_bayes_bag_counts_each_distinct_ngram_once_up_to_trigrams():
    bag = NgramBag(vocab_size=10, buckets=7, num_classes=2, order=3, features="naive_bayes")
    input_ids = torch.tensor([[3, 4, 3, 4, 0]])
    mask = lengths_to_mask(torch.tensor([4]), 5)
    bigram_34 = 10 + (3 * NgramBag.HASH_PRIME + 4) % 7
    bigram_43 = 10 + (4 * NgramBag.HASH_PRIME + 3) % 7
    trigram_343 = 10 + ((3 * NgramBag.HASH_PRIME + 4) % 7 * NgramBag.HASH_PRIME + 3) % 7
    trigram_434 = 10 + ((4 * NgramBag.HASH_PRIME + 3) % 7 * NgramBag.HASH_PRIME + 4) % 7
    ngrams = bag.ngram_ids(input_ids, mask)[0].tolist()
    # Unigrams 3 4 (3 4 repeat), bigrams 34 43 (34 repeats), trigrams 343 434; the rest is padding.
    assert ngrams[:4] == [3, 4, 0, 0] and ngrams[5:7] == [bigram_34, bigram_43] and ngrams[9:11] == [trigram_343, trigram_434]
    assert len(ngrams) == 5 + 4 + 3 and sorted(set(ngrams) - {0}) == sorted({3, 4, bigram_34, bigram_43, trigram_343, trigram_434})


def test_naive_bayes_ratios_are_the_smoothed_log_count_ratios():
    bag = NgramBag(vocab_size=6, buckets=3, num_classes=2, order=1, features="naive_bayes")
    input_ids = torch.tensor([[1, 1, 2], [1, 3, 0], [2, 0, 0]])
    lengths, labels = torch.tensor([3, 2, 1]), torch.tensor([1, 1, 0])
    assert bag.needs_counts
    counts = bag.count_texts([(input_ids[:2], lengths[:2], labels[:2]), (input_ids[2:], lengths[2:], labels[2:])])
    # Texts that contain each id, per class: token 1 is in both positive texts (once each).
    assert counts[1].tolist() == [0, 2] and counts[2].tolist() == [1, 1] and counts[3].tolist() == [0, 1]
    assert counts.sum().item() == 5
    bag.set_log_count_ratios(counts)
    positive = counts[:, 1] + 1  # (9,), smoothing 1 over every slot
    negative = counts[:, 0] + 1
    expected = (positive / positive.sum()).log() - (negative / negative.sum()).log()
    expected[0] = 0  # padding never counts
    torch.testing.assert_close(bag.log_count_ratios[:, 1], expected)
    torch.testing.assert_close(bag.log_count_ratios[:, 0], -expected)
    assert not bag.needs_counts
    with torch.no_grad():
        bag.weight.weight.fill_(1.0)
    mask = lengths_to_mask(lengths, 3)
    # Summed over the distinct tokens: the first text scores r(1) + r(2), token 1 counted once.
    torch.testing.assert_close(bag(input_ids, mask)[0, 1], expected[1] + expected[2])


def test_naive_bayes_ratios_with_three_classes_are_one_against_the_rest():
    bag = NgramBag(vocab_size=5, buckets=2, num_classes=3, order=1, features="naive_bayes")
    input_ids, lengths, labels = torch.tensor([[1, 2], [2, 3], [3, 4]]), torch.tensor([2, 2, 2]), torch.tensor([0, 1, 2])
    counts = bag.count_texts([(input_ids, lengths, labels)])
    bag.set_log_count_ratios(counts)
    for k in range(3):
        in_class = counts[:, k] + 1
        rest = counts.sum(dim=1) - counts[:, k] + 1
        expected = (in_class / in_class.sum()).log() - (rest / rest.sum()).log()
        expected[0] = 0
        torch.testing.assert_close(bag.log_count_ratios[:, k], expected)
    assert bag.log_count_ratios[1].argmax() == 0 and bag.log_count_ratios[4].argmax() == 2  # each token favours its class


def test_ngram_bag_options_are_checked():
    with pytest.raises(ValueError, match="order"):
        NgramBag(vocab_size=5, buckets=3, num_classes=2, order=0)
    with pytest.raises(ValueError, match="features"):
        NgramBag(vocab_size=5, buckets=3, num_classes=2, features="tfidf")
    with pytest.raises(ValueError, match="naive_bayes"):
        NgramBag(vocab_size=5, buckets=3, num_classes=2).set_log_count_ratios(torch.zeros(8, 2))


def test_rejects_negative_ngram_buckets():
    with pytest.raises(ValueError, match="ngram_buckets"):
        make_model(ngram_buckets=-1)


@pytest.mark.parametrize("order, features", [(2, "mean"), (3, "mean"), (3, "naive_bayes")])
def test_ngram_token_scores_split_the_class_score_exactly(order, features):
    bag = NgramBag(vocab_size=V, buckets=13, num_classes=K, order=order, features=features)
    input_ids, lengths = padded_batch()
    mask = lengths_to_mask(lengths, T)
    with torch.no_grad():
        bag.weight.weight[1:].normal_()
        if features == "naive_bayes":
            bag.log_count_ratios.normal_()
    shares = bag.token_scores(input_ids, mask, target=2)  # (B, T)
    torch.testing.assert_close(shares.sum(dim=1), bag(input_ids, mask)[:, 2])
    assert torch.all(shares[~mask] == 0)


@pytest.mark.parametrize("length", [1, 2])
def test_ngram_token_scores_of_a_text_shorter_than_the_order(length):
    bag = NgramBag(vocab_size=V, buckets=13, num_classes=K, order=3, features="naive_bayes")
    with torch.no_grad():
        bag.weight.weight[1:].normal_()
        bag.log_count_ratios.normal_()
    input_ids = torch.arange(1, length + 1)[None]  # (1, length)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    shares = bag.token_scores(input_ids, mask, target=1)  # (1, length)
    assert shares.shape == (1, length)
    torch.testing.assert_close(shares.sum(dim=1), bag(input_ids, mask)[:, 1])


def test_fit_side_weights_recovers_the_weights_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    gru_logits, ngram_logits = 2 * torch.randn(2, 20000, 3, generator=generator)
    labels = torch.multinomial(torch.softmax(0.3 * gru_logits + 1.5 * ngram_logits, dim=-1), 1, generator=generator)[:, 0]
    with torch.inference_mode():  # as Lightning validates
        weights = fit_side_weights(gru_logits.clone(), ngram_logits.clone(), labels.clone())
    torch.testing.assert_close(weights, torch.tensor([0.3, 1.5]), atol=0.06, rtol=0)


def test_a_side_that_misleads_is_turned_down_not_inverted():
    # The GRU side scores the wrong class: an unconstrained fit would give it a negative weight,
    # learning from the validation data instead of rescaling a side.
    generator = torch.Generator().manual_seed(0)
    ngram_logits = 2 * torch.randn(5000, 2, generator=generator)
    labels = torch.multinomial(torch.softmax(ngram_logits, dim=-1), 1, generator=generator)[:, 0]
    gru_logits = -ngram_logits + 2 * torch.randn(5000, 2, generator=generator)
    weights = fit_side_weights(gru_logits, ngram_logits, labels)
    assert (weights > 0).all()
    assert weights[0] < 0.01 and weights[1] == pytest.approx(1.0, abs=0.1)


def test_side_weights_stay_moderate_on_separable_validation_data():
    # A handful of validation texts that both sides already separate: the cross-entropy keeps
    # falling as the weights grow, so unpenalised the fit drove every margin to the thousands (or overflowed).
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(2, 12, (), generator=generator))
        labels = torch.randint(0, 2, (n,), generator=generator)
        sign = 2 * F.one_hot(labels, 2).float() - 1  # (n, 2): +1 on the right class
        scale = torch.rand(2, generator=generator) * torch.tensor([10.0, 3.0])
        gru_logits = sign * scale[0] * torch.rand(n, 1, generator=generator) + scale[1] * torch.randn(n, 2, generator=generator)
        ngram_logits = sign * scale[1] * torch.rand(n, 1, generator=generator)
        weights = fit_side_weights(gru_logits, ngram_logits, labels)
        served = weights[0] * gru_logits + weights[1] * ngram_logits  # (n, 2)
        margins = (served * sign).sum(dim=1)  # right class minus wrong class
        assert torch.isfinite(weights).all() and (weights > 0).all(), weights
        assert margins.min() < 30, (weights, margins)  # the least sure right answer is not p = 1 - 1e-13


def test_side_weights_weigh_the_served_logits_but_not_the_training_sum():
    torch.manual_seed(0)
    model = BiGRUClassifier(vocab_size=30, num_classes=2, embedding_dim=8, hidden_size=6, num_layers=1, dropout=0.0, embedding_dropout=0.0, ngram_buckets=11)
    nn.init.normal_(model.ngrams.weight.weight)
    input_ids, lengths = torch.randint(1, 30, (3, 5)), torch.tensor([5, 4, 2])
    model.side_weights.copy_(torch.tensor([0.5, 2.0]))
    served = model.eval()(input_ids, lengths)
    torch.testing.assert_close(served.logits, 0.5 * served.gru_logits + 2.0 * served.ngram_logits)
    trained = model.train()(input_ids, lengths)
    torch.testing.assert_close(trained.logits, trained.gru_logits + trained.ngram_logits)
    torch.testing.assert_close(trained.gru_logits, served.gru_logits)

    older = {name: value for name, value in model.state_dict().items() if name != "side_weights"}
    model.load_state_dict(older)  # a checkpoint from before side weights: the plain sum
    torch.testing.assert_close(model.side_weights, torch.ones(2))


@pytest.mark.parametrize(
    "setting, message",
    [({"hidden_size": 0}, "hidden_size must be at least 1"), ({"dropout": float("nan")}, "dropout must be in \\[0, 1\\), got nan")],
)
def test_a_setting_out_of_range_names_itself(setting, message):
    with pytest.raises(SettingError, match=message):
        BiGRUClassifier(vocab_size=10, num_classes=2, **setting)
