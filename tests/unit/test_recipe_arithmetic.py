"""The recipe's arithmetic (imgclf.training.schedule, .ema, .mixing, models.param_groups, data.train_transform):
per-step warmup and decay, gradient accumulation equal to the large batch, the EMA update, mixed targets that are
probabilities, every augmentation, no weight decay on biases and norms."""

from __future__ import annotations

import math

import pytest
import torch
from imgclf import config, models
from imgclf.errors import HyperparameterError
from imgclf.training import ema, mixing, schedule
from torch import nn


def hps(**values) -> config.Hyperparameters:
    return config.parse_hyperparameters({k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize("warmup_epochs, steps_per_epoch", [(1, 10), (2.5, 4), (0.5, 3)])
def test_warmup_reaches_lr_at_its_last_step_then_cosine_decays_to_zero(warmup_epochs, steps_per_epoch):
    hp = hps(epochs=5, warmup_epochs=warmup_epochs, lr=0.1)
    factor = schedule.lr_factor(hp, steps_per_epoch)
    warmup = round(warmup_epochs * steps_per_epoch)
    assert factor(0) == pytest.approx(1 / warmup)
    assert [factor(s) for s in range(warmup)] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert factor(warmup - 1) == 1.0 and factor(warmup) == 1.0  # lr at the last warmup step, then cosine from 1
    last = 5 * steps_per_epoch - 1
    assert 0 < factor(last) < factor(last - 1)  # down to near 0 at the last step, never 0 (a wasted step)
    assert factor(last) == pytest.approx(0.5 * (1 + math.cos(math.pi * (last - warmup) / (last + 1 - warmup))))
    # the real optimizer sees it: the LambdaLR moves the group's lr every step
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(models.param_groups(model, [], 0.1, 1.0), lr=0.1)
    scheduler = schedule.make_scheduler(hp, optimizer, steps_per_epoch)
    seen = []
    for _ in range(warmup + 2):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * factor(s) for s in range(warmup + 2)])
    assert seen[warmup - 1] == pytest.approx(0.1)


def test_step_and_constant_schedules_without_warmup():
    step = schedule.lr_factor(hps(epochs=6, lr_scheduler="step"), 10)
    assert [step(s) for s in (0, 19, 20, 39, 40, 59)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert {schedule.lr_factor(hps(epochs=3, lr_scheduler="none"), 7)(s) for s in range(21)} == {1.0}
    cosine = schedule.lr_factor(hps(epochs=2), 5)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_accumulated_gradients_equal_the_large_batch():
    """batch-size 4 with accumulate-steps 2: the loop's groups (schedule.accumulation) give the gradient of one
    batch of 8 (a model without batch statistics: BatchNorm normalises each batch on its own)."""
    torch.manual_seed(0)
    images, labels = torch.randn(20, 6), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    criterion = nn.CrossEntropyLoss()
    criterion(model(images[:8]), labels[:8]).backward()
    large = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    # an epoch of 5 batches: groups of 2, the last one short; the optimizer steps after each group's last batch
    assert [schedule.accumulation(b, 5, 2) for b in range(5)] == [(2, False), (2, True), (2, False), (2, True),
                                                                 (1, True)]
    for batch in range(2):
        group, _ = schedule.accumulation(batch, 5, 2)
        part = slice(4 * batch, 4 * batch + 4)
        (criterion(model(images[part]), labels[part]) / group).backward()
    for got, want in zip((p.grad for p in model.parameters()), large):
        assert torch.allclose(got, want, atol=1e-6)
    assert schedule.optimizer_steps(5, 2) == 3 and schedule.optimizer_steps(4, 1) == 4


def test_biases_and_norms_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = models.param_groups(model, ["4"], lr=0.01, backbone_lr_factor=0.1, weight_decay=0.05)
    names = {g["name"]: g for g in groups}
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("head", 0.01, 0.05, 1), ("head (biases and norms)", 0.01, 0.0, 1),
        ("backbone", pytest.approx(0.001), 0.05, 1), ("backbone (biases and norms)", pytest.approx(0.001), 0.0, 5)]
    assert names["head"]["params"][0] is model[4].weight and names["backbone"]["params"][0] is model[0].weight
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_the_ema_update_is_decay_times_ema_plus_the_rest_times_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    average = ema.averaged(model, decay=0.9)
    average.update_parameters(model)  # the first update copies
    before = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # training mode: BatchNorm's running statistics move
    average.update_parameters(model)
    now = model.state_dict()
    for key, value in average.module.state_dict().items():
        if value.is_floating_point():  # weights and running statistics; num_batches_tracked is copied
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * now[key], atol=1e-6), key
    assert ema.counterpart(average, model, model) is average.module
    assert ema.counterpart(average, model, model[2]) is average.module[2]


def test_the_ema_matches_torchs_averaged_model_without_reading_its_count_back_each_step(monkeypatch):
    """The same average as torch's AveragedModel, and after the first update no tensor is read back to the host
    (on a GPU each read is a synchronisation per optimizer step); a loaded state is read once."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ours = ema.averaged(model, decay=0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)

    def train_step():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(8, 3))

    reads = []
    for step in range(4):
        train_step()
        with monkeypatch.context() as m:
            if step:  # the first update copies the weights, and reads the count once
                m.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or True)
            ours.update_parameters(model)
        torchs.update_parameters(model)
    assert reads == []
    for key, value in torchs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    resumed = ema.averaged(model, decay=0.9)
    resumed.load_state_dict(ours.state_dict())
    assert resumed.started is None and int(resumed.n_averaged) == 4


def test_mixed_targets_are_probabilities_and_mixing_stops_at_its_epoch():
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    for recipe in ({"mixup": 0.2}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}):
        mix = mixing.BatchMix.from_hyperparameters(hps(**recipe, mixup_off_epoch=3), num_classes=4)
        mixed, targets = mix.maybe(images, labels, epoch=0)
        assert mixed.shape == images.shape and not torch.equal(mixed, images)
        assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets >= 0).all()
        # epoch 3 (1-based) and later: clean batches, the labels as they are
        clean = mix.maybe(images, labels, epoch=2)
        assert clean[0] is images and clean[1] is labels
    assert mixing.BatchMix.from_hyperparameters(hps(), 4) is None
    never = mixing.BatchMix.from_hyperparameters(hps(mixup=0.2, mixup_prob=0.0), 4)
    clean = never.maybe(images, labels, epoch=0)
    assert clean[0] is images and clean[1] is labels
    # the loss takes the soft targets as they are
    assert nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 4), targets).isfinite()


@pytest.mark.parametrize("augment", ["none", "flip", "trivialaugment", "randaugment"])
def test_every_augmentation_gives_the_model_its_input(augment):
    from imgclf import data
    from imgclf.preprocessing import Preprocessing
    from PIL import Image

    prep = Preprocessing(image_size=32)
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    torch.manual_seed(0)
    out = data.train_transform(prep, augment, random_erase=1.0)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert (out == 0).all(dim=0).any()  # a rectangle erased to 0 (the mean, after normalisation)


def test_drop_path_and_layer_decay_for_timm_models():
    model = models.build_backbone("timm/test_vit", drop_path=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)  # timm spreads it linearly over the blocks, to the last
    head = models.replace_head(model, 5)
    groups = models.param_groups(model, head, lr=0.01, backbone_lr_factor=1.0, weight_decay=0.05, layer_decay=0.5)
    lrs = [g["lr"] for g in groups]
    assert max(lrs) == pytest.approx(0.01) and min(lrs) < 0.01 / 2  # the head at lr, the stem decayed the most
    head_params = {id(p) for p in model.get_submodule(head[0]).parameters()}
    assert all(g["lr"] == pytest.approx(0.01) for g in groups if head_params & {id(p) for p in g["params"]})
    assert {g["weight_decay"] for g in groups if all(p.ndim <= 1 for p in g["params"])} == {0.0}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the lr that the metric lines, metrics.json and the Debugger's `lr` tensor record is the head's, not the first
    # group's (timm lists the stem first)
    optimizer = torch.optim.AdamW(groups)
    assert optimizer.param_groups[0]["lr"] < 0.01 and models.head_lr(optimizer) == pytest.approx(0.01)
    with pytest.raises(HyperparameterError, match="drop-path=0.1: timm models only"):
        hps(model="resnet18", drop_path=0.1)
    with pytest.raises(HyperparameterError, match="layer-decay and backbone-lr-factor"):
        hps(model="timm/test_vit", layer_decay=0.7, backbone_lr_factor=0.1)
