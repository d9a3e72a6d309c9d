"""LitClassifier: schedule, checkpoint round trip, and both precisions on CPU."""

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from gru_nlp.api import TextClassifier
from gru_nlp.data import TextDataModule
from gru_nlp.lit import CHECKPOINT_KEY, LitClassifier, warmup_cosine
from gru_nlp.model import adversarial_perturbation, fit_side_weights, lengths_to_mask
from gru_nlp.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_cosine_decay():
    schedule = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.55)  # half way down the cosine
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)


def test_inconsistent_label_names_are_refused():
    with pytest.raises(ValueError, match="label_names has 3 names but num_classes is 2"):
        LitClassifier(vocab_size=50, num_classes=2, label_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> TextDataModule:
    cache = tmp_path_factory.mktemp("cache")
    return TextDataModule(str(REPO / "tests/fixtures/tiny"), vocab_size=300, min_frequency=1, max_length=64, batch_size=16, val_size=0.2, cache_dir=str(cache))


def fit_tiny(data: TextDataModule, root, precision: str = "32-true", **trainer_settings) -> tuple[L.Trainer, LitClassifier]:
    L.seed_everything(0, verbose=False)
    model = LitClassifier(data.vocab_size, data.num_classes, data.label_names, embedding_dim=16, hidden_size=12, num_layers=1, lr=0.01)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        precision=precision,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return trainer, model


def test_checkpoint_reloads_to_identical_logits_and_carries_what_inference_needs(tiny_data, tmp_path):
    trainer, model = fit_tiny(tiny_data, tmp_path)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    reloaded = LitClassifier.load_from_checkpoint(path, map_location="cpu")
    batch = next(iter(tiny_data.val_dataloader()))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch["input_ids"], batch["lengths"]), model(batch["input_ids"], batch["lengths"]), rtol=0, atol=0)

    extras = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
    assert extras["label_names"] == ["neg", "pos"]
    assert extras["max_length"] == 64 and extras["truncation"] == "head_tail"
    assert extras["tokenizer"] == tiny_data.tokenizer.to_str()
    assert reloaded.inference_config["tokenizer"] == extras["tokenizer"]
    # The run folder carries the tokenizer too.
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tiny_data.tokenizer.to_str()


def test_bf16_mixed_trains_on_cpu_with_gradient_clipping(tiny_data, tmp_path):
    # imdb.yaml clips gradients; Lightning cannot clip them for a fused AdamW under mixed precision.
    trainer, model = fit_tiny(tiny_data, tmp_path, precision="bf16-mixed", gradient_clip_val=1.0)
    assert trainer.global_step > 0
    assert not trainer.optimizers[0].defaults["fused"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # mixed: weights stay fp32


def test_branch_loss_adds_each_sides_own_loss_in_training_only():
    torch.manual_seed(0)
    lit = LitClassifier(
        vocab_size=40, num_classes=3, embedding_dim=8, hidden_size=6, num_layers=1,
        dropout=0.0, embedding_dropout=0.0, ngram_buckets=17, branch_loss=0.5,
    )  # no dropout: training and evaluation compute the same logits
    with torch.no_grad():
        lit.model.ngrams.weight.weight[1:].normal_()
    batch = {"input_ids": torch.randint(1, 40, (4, 6)), "lengths": torch.tensor([6, 5, 3, 1]), "labels": torch.tensor([0, 1, 2, 1])}
    lit.eval()
    output = lit.model(batch["input_ids"], batch["lengths"])
    cross_entropy = torch.nn.functional.cross_entropy
    joint = cross_entropy(output.logits, batch["labels"])
    sides = cross_entropy(output.gru_logits, batch["labels"]) + cross_entropy(output.ngram_logits, batch["labels"])
    torch.testing.assert_close(lit._shared_step(batch, lit.val_metrics), joint)
    lit.train()
    torch.testing.assert_close(lit._shared_step(batch, lit.train_metrics), joint + 0.5 * sides)


def test_the_adversarial_step_has_its_norm_per_text_and_raises_the_loss_more_than_a_random_one():
    torch.manual_seed(0)
    lit = LitClassifier(vocab_size=40, num_classes=2, embedding_dim=8, hidden_size=6, num_layers=1, dropout=0.0, embedding_dropout=0.0)
    input_ids, lengths, labels = torch.randint(1, 40, (4, 7)), torch.tensor([7, 5, 3, 1]), torch.tensor([0, 1, 1, 0])
    mask = lengths_to_mask(lengths, 7)
    input_ids = input_ids.masked_fill(~mask, 0)
    embedded = lit.model.embedding(input_ids).detach().requires_grad_(True)  # (4, 7, 8)

    def loss_at(vectors):
        return torch.nn.functional.cross_entropy(lit.model(input_ids, lengths, embedded=vectors).logits, labels)

    (gradient,) = torch.autograd.grad(loss_at(embedded), embedded)
    step = adversarial_perturbation(gradient, embedded, mask, norm=0.05)
    rms = embedded.detach()[mask].square().mean().sqrt()
    torch.testing.assert_close(step.flatten(1).norm(dim=1), torch.full((4,), 0.05 * rms.item()))
    assert step[~mask].abs().max() == 0 and not step.requires_grad
    with torch.no_grad():
        clean, adversarial = loss_at(embedded), loss_at(embedded + step)
        random = torch.randn_like(step) * mask[..., None]
        random = random * (step.flatten(1).norm(dim=1) / random.flatten(1).norm(dim=1))[:, None, None]
        assert adversarial > loss_at(embedded + random) and adversarial > clean
    # A text whose gradient is zero is left alone, not divided by zero.
    assert adversarial_perturbation(torch.zeros_like(gradient), embedded, mask, 1.0).abs().max() == 0


def test_adversarial_training_learns_from_the_mean_of_the_clean_and_the_perturbed_loss():
    lit = LitClassifier(
        vocab_size=40, num_classes=3, embedding_dim=8, hidden_size=5, num_layers=1,
        dropout=0.0, embedding_dropout=0.5, ngram_buckets=17, branch_loss=0.5, adversarial_norm=2.0,
    )  # word dropout is the only randomness, so that reseeding replays the step by hand
    with torch.no_grad():
        lit.model.ngrams.weight.weight[1:].normal_()
    batch = {"input_ids": torch.randint(1, 40, (4, 6)), "lengths": torch.tensor([6, 5, 3, 2]), "labels": torch.tensor([0, 1, 2, 1])}
    mask = lengths_to_mask(batch["lengths"], 6)
    batch["input_ids"] = batch["input_ids"].masked_fill(~mask, 0)
    lit.train()
    torch.manual_seed(1)
    loss, clean_loss, adversarial_loss = lit._adversarial_step(batch)
    loss.backward()
    got = {name: parameter.grad.clone() for name, parameter in lit.named_parameters()}

    lit.zero_grad()
    torch.manual_seed(1)
    embedded = lit.model.embed(batch["input_ids"])  # one word-dropout draw, read by both passes
    probe = embedded.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(lit._loss(lit.model(batch["input_ids"], batch["lengths"], embedded=probe), batch["labels"]), probe)
    step = adversarial_perturbation(gradient, probe, mask, 2.0)
    clean = lit._loss(lit.model(batch["input_ids"], batch["lengths"], embedded=embedded), batch["labels"])
    adversarial = lit._loss(lit.model(batch["input_ids"], batch["lengths"], embedded=embedded + step), batch["labels"])
    ((clean + adversarial) / 2).backward()
    torch.testing.assert_close((clean_loss, adversarial_loss), (clean.detach(), adversarial.detach()))
    torch.testing.assert_close(loss.detach(), (clean + adversarial).detach() / 2)
    assert adversarial > clean
    for name, parameter in lit.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, msg=name)


def test_adversarial_training_fits_logs_both_losses_and_is_refused_below_zero(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="adversarial_norm must be 0 or more, got -1"):
        LitClassifier(vocab_size=50, num_classes=2, adversarial_norm=-1.0)
    L.seed_everything(0, verbose=False)
    model = LitClassifier(
        tiny_data.vocab_size, tiny_data.num_classes, tiny_data.label_names, embedding_dim=16, hidden_size=12,
        num_layers=1, lr=0.01, ngram_buckets=64, ngram_features="naive_bayes", ngram_lr=0.01, adversarial_norm=1.0,
    )
    model.model.embedding.weight.requires_grad_(False)  # a frozen embedding still gets its perturbation
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", precision="bf16-mixed", gradient_clip_val=1.0, default_root_dir=tmp_path,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=tiny_data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and metrics["train/adversarial_loss"] > metrics["train/loss"] > 0


def test_naive_bayes_bag_counts_the_training_set_once_and_the_checkpoint_keeps_it(tiny_data, tmp_path):
    L.seed_everything(0, verbose=False)
    model = LitClassifier(
        tiny_data.vocab_size, tiny_data.num_classes, tiny_data.label_names, embedding_dim=16, hidden_size=12,
        num_layers=1, ngram_buckets=64, ngram_order=3, ngram_features="naive_bayes", ngram_lr=0.01,
    )
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=tiny_data)
    bag = model.model.ngrams
    train = ((batch["input_ids"], batch["lengths"], batch["labels"]) for batch in tiny_data.train_dataloader())
    expected = bag.log_count_ratios.clone()
    bag.set_log_count_ratios(bag.count_texts(train))
    torch.testing.assert_close(bag.log_count_ratios, expected, rtol=0, atol=0)  # every training text, once
    assert expected.abs().sum() > 0 and bag.weight.weight.abs().sum() > 0  # ratios set, weights trained

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = LitClassifier.load_from_checkpoint(path, map_location="cpu")
    torch.testing.assert_close(reloaded.model.ngrams.log_count_ratios, expected, rtol=0, atol=0)
    assert not reloaded.model.ngrams.needs_counts  # resuming from it would not count again
    served = TextClassifier.from_checkpoint(path, device="cpu").model.ngrams
    assert (served.order, served.features) == (3, "naive_bayes")
    torch.testing.assert_close(served.log_count_ratios, expected, rtol=0, atol=0)


def test_validation_fits_the_side_weights_that_choose_and_serve_the_checkpoint(tiny_data, tmp_path):
    L.seed_everything(0, verbose=False)
    model = LitClassifier(
        tiny_data.vocab_size, tiny_data.num_classes, tiny_data.label_names, embedding_dim=16, hidden_size=12,
        num_layers=1, lr=0.01, ngram_buckets=64, ngram_features="naive_bayes", ngram_lr=0.01, branch_loss=1.0,
    )
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=tiny_data)

    model.eval()
    gru, ngram, labels, served = [], [], [], []
    with torch.no_grad():
        for batch in tiny_data.val_dataloader():
            output = model.model(batch["input_ids"], batch["lengths"])
            gru.append(output.gru_logits), ngram.append(output.ngram_logits), labels.append(batch["labels"])
            served.append(output.logits)
    gru, ngram, labels, served = (torch.cat(parts) for parts in (gru, ngram, labels, served))
    weights = model.model.side_weights
    assert not torch.equal(weights, torch.ones(2))
    torch.testing.assert_close(weights, fit_side_weights(gru, ngram, labels))  # fitted on this validation split
    torch.testing.assert_close(served, weights[0] * gru + weights[1] * ngram)
    accuracy = (served.argmax(-1) == labels).float().mean()
    torch.testing.assert_close(trainer.callback_metrics["val/acc"], accuracy)  # what checkpoints are chosen by

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    classifier = TextClassifier.from_checkpoint(path, device="cpu")
    torch.testing.assert_close(classifier.model.side_weights, weights)


def test_ddp_does_not_copy_the_model_buffers_that_every_process_computes_alike(tmp_path):
    lit = LitClassifier(vocab_size=50, num_classes=2, ngram_buckets=64, ngram_features="naive_bayes", class_weights=[1.0, 2.0])
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        copied = torch.nn.parallel.DistributedDataParallel(lit).named_module_buffers  # broadcast before each forward
    finally:
        torch.distributed.destroy_process_group()
    assert {"model.side_weights", "model.ngrams.log_count_ratios"} <= {name for name, _ in lit.named_buffers()}
    assert list(copied) == ["loss_fn.weight"]  # not the bag's (V + buckets, K) ratios, 32 MB with imdb.yaml


def test_prediction_writer_numbers_batches_that_carry_no_index_in_order(tmp_path):
    from gru_nlp.batching import collate
    from gru_nlp.callbacks import PredictionWriter

    torch.manual_seed(0)
    model = LitClassifier(vocab_size=30, num_classes=2, label_names=["neg", "pos"], embedding_dim=8, hidden_size=6, num_layers=1)
    sequences = [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12], [13, 14]]
    # Batches as another data module might serve them: collated, without TextDataModule's "index".
    loader = torch.utils.data.DataLoader([{"input_ids": ids} for ids in sequences], batch_size=3, collate_fn=collate)
    assert all("index" not in batch for batch in loader)
    trainer = L.Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False, callbacks=[PredictionWriter()])
    expected = torch.cat([prediction["probs"] for prediction in trainer.predict(model, loader)])  # (5, 2)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([[line["probs"]["neg"], line["probs"]["pos"]] for line in lines]), expected)
    assert [line["label"] for line in lines] == [["neg", "pos"][i] for i in expected.argmax(-1).tolist()]
