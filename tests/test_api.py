"""TextClassifier: predictions match the model, batching keeps order, explanations add up."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gru_nlp.api import Int8GRU, Prediction, TextClassifier
from gru_nlp.checkpoint import build_model, load_checkpoint
from gru_nlp.model import NgramBag
from gru_nlp.tokenizer import encode

TEXTS = [
    "a bad dull film",
    "good",
    "great story , good ending , lovely and really a very good film overall",
    "okay",
    "awful . bad",
    "lovely acting, plain plot and a boring ending",
]


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint) -> TextClassifier:
    return TextClassifier.from_checkpoint(tiny_checkpoint, device="cpu")


def test_round_trip_matches_model_logits(tiny_checkpoint, classifier):
    model, tokenizer, labels, max_length, truncation = build_model(load_checkpoint(tiny_checkpoint))
    predictions = classifier.predict(TEXTS, batch_size=4)
    for text, prediction in zip(TEXTS, predictions):
        (ids,) = encode(tokenizer, [text], max_length, truncation)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.tensor([len(ids)])).logits
        expected = torch.softmax(logits, dim=-1)[0].numpy()
        np.testing.assert_allclose(list(prediction.probs.values()), expected, atol=1e-6)
        assert prediction.label == labels[int(expected.argmax())]
        assert prediction.score == pytest.approx(float(expected.max()))
        assert prediction.text == text
        assert prediction.num_tokens == len(ids)


def test_order_preserved_with_mixed_lengths(classifier):
    one_by_one = np.stack([classifier.predict_proba(text)[0] for text in TEXTS])
    batched = classifier.predict_proba(TEXTS, batch_size=2)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    reversed_order = classifier.predict_proba(TEXTS[::-1], batch_size=4)
    np.testing.assert_allclose(reversed_order[::-1], one_by_one, atol=1e-6)


def test_batched_outputs_cover_every_text_once_and_give_each_sides_scores(tiny_checkpoint):
    classifier = TextClassifier.from_checkpoint(tiny_checkpoint, device="cpu")
    model = classifier.model
    model.ngrams = NgramBag(model.embedding.num_embeddings, buckets=5, num_classes=3, pad_id=classifier._pad_id)
    model.register_buffer("side_weights", torch.tensor([0.5, 2.0]))  # (w_gru, w_ngram)
    seen, probs = [], np.zeros((len(TEXTS), 3), dtype=np.float32)
    for rows, output in classifier.batched_outputs(TEXTS, batch_size=4):
        assert not torch.is_inference_mode_enabled()  # the caller's code between batches runs as usual
        seen += rows
        probs[rows] = torch.softmax(output.logits, dim=-1).numpy()
        torch.testing.assert_close(output.logits, 0.5 * output.gru_logits + 2.0 * output.ngram_logits)
    assert sorted(seen) == list(range(len(TEXTS))) and seen != list(range(len(TEXTS)))  # length order, not input order
    np.testing.assert_allclose(probs, classifier.predict_proba(TEXTS), atol=1e-6)


def test_probabilities_shapes_and_determinism(classifier):
    probs = classifier.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs, classifier.predict_proba(TEXTS))
    assert classifier.labels == ["neg", "neu", "pos"]
    single = classifier.predict("good")
    assert isinstance(single, Prediction)
    assert list(single.probs) == classifier.labels
    assert sum(single.probs.values()) == pytest.approx(1.0)
    assert classifier.predict([]) == [] and classifier.predict_proba([]).shape == (0, 3)


def test_awkward_texts(classifier):
    long_text = "good film " * 10_000  # 100,000 characters
    texts = ["", "   \n\t", long_text, "😀🎬🍿", "\x00\x07\x1b[31m bad", "映画はとても良かった", "Фильм плохой", "ok\u200bay"]
    predictions = classifier.predict(texts)
    assert [p.empty for p in predictions] == [True, True, False, False, False, False, False, False]
    assert predictions[2].num_tokens == classifier.max_length
    for prediction in predictions:
        assert prediction.label in classifier.labels
        assert sum(prediction.probs.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text", ["\x00\x01", "\u200b", " \t\n", "\x00 \ufeff \x07"])
def test_only_control_format_and_space_characters_are_empty(classifier, text):
    assert classifier.predict(text).empty


@pytest.mark.parametrize("texts", [5, None, b"good", 2.5])
def test_texts_of_the_wrong_type_name_the_type(classifier, texts):
    expected = f"texts must be a string or a list of strings, got {type(texts).__name__}"
    with pytest.raises(TypeError, match=expected):
        classifier.predict(texts)
    with pytest.raises(TypeError, match=expected):
        classifier.predict_proba(texts)
    with pytest.raises(TypeError, match="texts must be strings, got int at position 1"):
        classifier.predict(["good", 5])


def test_a_device_that_is_no_name_or_holds_no_weights_is_refused(tiny_checkpoint):
    with pytest.raises(TypeError, match="device must be a name such as 'auto'"):
        TextClassifier.from_checkpoint(tiny_checkpoint, device=None)
    with pytest.raises(ValueError, match="device 'meta' holds no weights"):
        TextClassifier.from_checkpoint(tiny_checkpoint, device="meta")


def test_a_table_or_a_mapping_is_refused_not_read_as_its_column_names(classifier):
    import pandas as pd

    with pytest.raises(TypeError, match=r"got DataFrame: pass its text column, e.g. frame\['text'\]"):
        classifier.predict(pd.DataFrame({"text": ["awful", "a joy", "fine"]}))
    with pytest.raises(TypeError, match="got dict"):
        classifier.predict_proba({"text": "good"})
    assert len(classifier.predict(pd.Series(["awful", "a joy"]))) == 2  # a column is a list of texts


def test_a_text_with_bytes_that_were_not_utf8_is_an_error_naming_it(classifier):
    # Python decodes undecodable argv / stdin bytes to lone surrogates ("caf\xe9" -> "caf\udce9").
    for call in (classifier.predict, classifier.explain):
        with pytest.raises(ValueError, match=r"text at position 0 is not valid Unicode .*'\\udce9' at character 3"):
            call("caf\udce9")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_random_unicode_never_crashes(classifier, texts):
    probs = classifier.predict_proba(texts, batch_size=2)
    assert probs.shape == (len(texts), 3)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("method", ["attention", "grad_x_input", "integrated_gradients"])
def test_explanation_words_and_weights(classifier, method):
    text = "A  lovely,\tgood film"
    explanation = classifier.explain(text, method=method)
    assert explanation.words == text.split()
    assert [text[start:end] for start, end in explanation.spans] == explanation.words
    assert explanation.weights.shape == (len(explanation.words),)
    assert explanation.weights.sum() == pytest.approx(1.0)
    assert (explanation.weights >= 0).all()
    assert explanation.method == method
    assert explanation.prediction == classifier.predict(text)
    if method == "attention":
        np.testing.assert_allclose(explanation.attributions, explanation.weights)
    else:
        np.testing.assert_allclose(
            np.abs(explanation.attributions) / np.abs(explanation.attributions).sum(), explanation.weights
        )


def test_integrated_gradients_complete(classifier):
    """IG attributions sum to about logit(text) - logit(all-zero embeddings) for the predicted label."""
    text = "lovely acting, awful plot"
    explanation = classifier.explain(text, method="integrated_gradients")
    (ids,) = classifier._encode([text])
    input_ids, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    target = classifier.labels.index(explanation.prediction.label)
    model = classifier.model
    with torch.no_grad():
        full = model(input_ids, lengths).logits[0, target]
        baseline = model(torch.zeros_like(input_ids), lengths).logits[0, target]  # pad embedding is zero
    assert explanation.token_weights.sum() == pytest.approx(float(full - baseline), abs=0.05)


def test_gradient_explanations_include_the_ngram_bag_exactly(tiny_checkpoint):
    """With an n-gram bag, IG sums to the GRU side's logit change plus the bag's whole score, each as weighted when served."""
    classifier = TextClassifier.from_checkpoint(tiny_checkpoint, device="cpu")
    model = classifier.model
    torch.manual_seed(0)
    bag = NgramBag(model.embedding.num_embeddings, buckets=5, num_classes=3, pad_id=classifier._pad_id)
    with torch.no_grad():
        bag.weight.weight[1:].normal_(mean=3.0)  # every class's score near 3, whichever the tokenizer's ids
    model.ngrams = bag
    model.register_buffer("side_weights", torch.tensor([0.5, 2.0]))  # (w_gru, w_ngram)
    text = "lovely acting, awful plot"
    explanation = classifier.explain(text, method="integrated_gradients")
    (ids,) = classifier._encode([text])
    input_ids, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    target = classifier.labels.index(explanation.prediction.label)
    with torch.no_grad():
        bag_score = bag(input_ids, torch.ones_like(input_ids, dtype=torch.bool))[0, target]
        model.ngrams = None
        full = model(input_ids, lengths).logits[0, target]
        baseline = model(torch.zeros_like(input_ids), lengths).logits[0, target]
    assert abs(float(bag_score)) > 0.5  # the bag's share is large enough to be missed
    assert explanation.token_weights.sum() == pytest.approx(float(0.5 * (full - baseline) + 2.0 * bag_score), abs=0.05)


def test_explanations_of_a_truncated_text_weigh_the_tokens_the_model_read(classifier):
    # head_tail with max_length 9 reads the first 2 tokens and the last 7. The middle repeats the
    # token after the head, so matching ids alone would also fit "the first 9 tokens".
    words = ["a", ","] + ["."] * 12 + [",", "a"]  # single characters: one token each whatever the vocabulary
    text = " ".join(words)
    assert (classifier.max_length, classifier.truncation) == (9, "head_tail")
    assert len(classifier.tokenizer.encode(text, add_special_tokens=False).ids) == len(words)  # one token per word
    read = {0, 1, *range(len(words) - 7, len(words))}
    for method in ("attention", "integrated_gradients"):
        explanation = classifier.explain(text, method=method)
        assert {i for i, weight in enumerate(explanation.weights) if weight > 0} == read
        assert explanation.tokens == ["a", ","] + ["."] * 5 + [",", "a"]


def test_explaining_in_one_thread_leaves_predictions_in_another_unchanged(classifier):
    texts = ["a good film", "a bad film", "an okay film"]  # the same token length as the explained text
    expected = classifier.predict_proba(texts)
    stop = threading.Event()

    def explain_until_stopped() -> None:
        while not stop.is_set():
            classifier.explain("a lovely film", method="integrated_gradients")

    explainer = threading.Thread(target=explain_until_stopped)
    explainer.start()
    try:
        results = [classifier.predict_proba(texts) for _ in range(100)]
    finally:
        stop.set()
        explainer.join()
    for probs in results:
        np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_class_ids_read_gold_labels_as_training_does(classifier):
    assert classifier.labels == ["neg", "neu", "pos"]
    assert classifier.class_ids(["pos", "neg", "neu"]).tolist() == [2, 0, 1]
    assert classifier.class_ids([2, 0, 1.0, np.int64(1)]).tolist() == [2, 0, 1, 1]  # integers are ids
    assert classifier.class_ids([True, False]).tolist() == classifier.class_ids(np.array([True, False])).tolist() == [1, 0]  # as training reads booleans
    with pytest.raises(ValueError, match=r"label 'great' at position 1 is not one of the model's classes"):
        classifier.class_ids(["pos", "great"])
    with pytest.raises(ValueError, match="label 3 at position 0"):
        classifier.class_ids([3, 0])
    with pytest.raises(TypeError, match="labels must be a list of labels, got one str: 'pos'"):
        classifier.class_ids("pos")


def test_class_ids_read_integer_labels_as_the_checkpoints_training_did(classifier):
    def served(integer_labels):
        model, tokenizer = classifier.model, classifier.tokenizer
        return TextClassifier(model, tokenizer, classifier.labels, 9, "head_tail", integer_labels=integer_labels)

    trained_on_names = served({})
    assert trained_on_names.class_ids(["pos", "neg"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"label 0 at position 0 .* trained on labels written as these names"):
        trained_on_names.class_ids([0, 2])  # by position it would be "neg", a guess
    assert served({5: 0, 3: 1, 1: 2}).class_ids([1, 3, 5]).tolist() == [2, 1, 0]  # star ratings, as training read them
    with pytest.raises(ValueError, match="label 0 at position 0"):
        served({5: 0, 3: 1, 1: 2}).class_ids([0, 1])
    # Trained on 0, 1, 2 by position, with classes named "1", "2", "3": the record wins over the names.
    model, tokenizer = classifier.model, classifier.tokenizer
    by_position = TextClassifier(model, tokenizer, ["1", "2", "3"], 9, "head_tail", integer_labels={0: 0, 1: 1, 2: 2})
    assert by_position.class_ids([1, 2]).tolist() == [1, 2]


def test_an_explanation_as_json_and_explain_given_a_list(classifier):
    explanation = classifier.explain("a bad dull film")
    record = json.loads(json.dumps(explanation.to_dict()))
    assert record["method"] == "attention" and record["label"] == explanation.prediction.label
    assert record["words"] == ["a", "bad", "dull", "film"]
    np.testing.assert_allclose(record["weights"], explanation.weights, atol=1e-6)
    with pytest.raises(TypeError, match="explain takes one text, a str, got list"):
        classifier.explain(["a", "b"])


def test_explain_edge_cases_and_gates(classifier):
    empty = classifier.explain("")
    assert empty.words == [] and empty.weights.shape == (0,) and empty.prediction.empty
    assert "<b>" in empty.to_html()

    explanation = classifier.explain("good <script>alert(1)</script> film", gates=True)
    assert explanation.gates.shape == (2, 2, len(explanation.words))
    assert np.nanmin(explanation.gates) >= 0 and np.nanmax(explanation.gates) <= 1
    html = explanation.to_html()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "\x1b[" in explanation.to_terminal(color=True)
    plain = explanation.to_terminal(color=False)
    assert "\x1b[" not in plain and len(plain.splitlines()) == 1 + len(explanation.words)
    with pytest.raises(ValueError, match="method"):
        classifier.explain("good", method="shap")


def test_int8_gru_scheme_matches_fp32(classifier):
    """Before quantization, the per-layer nn.GRU rebuild computes exactly what PaddingSafeGRU does."""
    torch.manual_seed(0)
    gru = classifier.model.gru
    inputs = torch.randn(3, 7, gru.input_size)
    lengths = torch.tensor([7, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(Int8GRU(gru)(inputs, lengths), gru(inputs, lengths), atol=1e-5, rtol=1e-5)


def test_quantized_classifier_close_to_fp32(tiny_checkpoint, classifier):
    quantized = TextClassifier.from_checkpoint(tiny_checkpoint, quantize=True)
    assert quantized.quantized and quantized.device.type == "cpu"
    probs = quantized.predict_proba(TEXTS)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, classifier.predict_proba(TEXTS), atol=0.05)
    with pytest.raises(ValueError, match="CPU only"):
        TextClassifier.from_checkpoint(tiny_checkpoint, device="cuda", quantize=True)


def test_api_import_does_not_load_lightning_or_datasets():
    code = "import sys, gru_nlp.api; print(sorted(m for m in ('lightning', 'pytorch_lightning', 'datasets') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
