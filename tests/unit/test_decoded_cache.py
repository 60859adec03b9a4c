"""The training job's data path (imgclf.data): images decoded once into RAM, uint8 from the workers, the float work
in `Normalise`. Its batches must be today's: the same seed and sampler give torch.equal batches on the CPU; the
reference is today's path written out (sampling.SeededDataset decoding every file, torchvision's float transforms)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from imgclf import data, sample_data
from imgclf.errors import HyperparameterError
from imgclf.preprocessing import Preprocessing
from imgclf.training.sampling import EpochSampler, SeededDataset
from PIL import Image
from torchvision import transforms

PREP = Preprocessing(image_size=32)  # resize_size 37: the draft size, so large JPEGs decode at 1/2 .. 1/8


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[tuple[Path, int]]:
    """JPEGs of several sizes (drafted and not), a grayscale JPEG, an EXIF-rotated one and a transparent PNG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    found = []
    for i, (width, height) in enumerate([(40, 30), (96, 72), (300, 225), (225, 300), (500, 375), (160, 90)]):
        path = root / f"photo_{i}.jpg"
        sample_data.draw(i, rng, 96).resize((width, height)).save(path, quality=90)
        found.append((path, i % 3))
    sample_data.draw(1, rng, 120).convert("L").save(root / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees; load_rgb applies it, swapping the sides
    sample_data.draw(2, rng, 200).resize((200, 120)).save(root / "rotated.jpg", exif=exif)
    rgba = sample_data.draw(3, rng, 64).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    return found + [(root / "gray.jpg", 0), (root / "rotated.jpg", 1), (root / "alpha.png", 2)]


def todays_train_transform(augment: str, random_erase: float):
    """The training transform before decode-once: torchvision's steps, floats made in the worker."""
    interpolation = transforms.InterpolationMode.BILINEAR
    policy = [transforms.TrivialAugmentWide(interpolation=interpolation)] if augment == "trivialaugment" else []
    steps = [transforms.RandomResizedCrop(PREP.image_size, interpolation=interpolation, antialias=True),
             transforms.RandomHorizontalFlip(), *policy, transforms.ToTensor(),
             transforms.Normalize(PREP.mean, PREP.std)]
    return transforms.Compose(steps + erasing(random_erase))


def erasing(p: float) -> list:
    return [transforms.RandomErasing(p=p, value=0)] if p else []


def todays_eval_transform():
    """torchvision's evaluation transform (centre mode): what the eval path has always equalled."""
    return transforms.Compose([transforms.Resize(PREP.resize_size, antialias=True),
                               transforms.CenterCrop(PREP.image_size), transforms.ToTensor(),
                               transforms.Normalize(PREP.mean, PREP.std)])


def decoded(dataset: data.ImageDataset) -> data.ImageDataset:
    dataset.decoded = data.DecodedImages.measure([p for p, _ in dataset.samples], dataset.draft_size, threads=2)
    return dataset


def loader(dataset, sampler=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)  # in-process: the unit tier


@pytest.mark.parametrize(("augment", "random_erase", "cache"), [("flip", 0.0, True), ("trivialaugment", 0.5, True),
                                                                ("flip", 0.5, False), ("none", 0.5, True)])
def test_training_batches_equal_todays_for_the_same_seed(samples, augment, random_erase, cache):
    """Two epochs under one seed and sampler: old path (files decoded every time, floats in the worker) and new path
    (decoded once or not, uint8 from the worker, Normalise in the main process) give torch.equal batches."""
    reference = (todays_train_transform(augment, random_erase) if augment != "none" else
                 transforms.Compose([data.eval_transform(PREP), *erasing(random_erase)]))
    old = SeededDataset(samples, reference, PREP.resize_size)
    new = data.ImageDataset(samples, data.train_transform(PREP, augment, random_erase, uint8=True), PREP.resize_size)
    if cache:
        decoded(new)
    old_sampler, new_sampler = EpochSampler(len(samples), seed=7), EpochSampler(len(samples), seed=7)
    batches = data.DeviceBatches(loader(new, new_sampler), data.Normalise(PREP.mean, PREP.std, torch.device("cpu")))
    erased = 0
    for epoch in range(2):
        old_sampler.set_epoch(epoch)
        new_sampler.set_epoch(epoch)
        pairs = list(zip(loader(old, old_sampler), batches, strict=True))
        assert len(pairs) == 3
        for (old_images, old_labels), (new_images, new_labels) in pairs:
            assert new_images.dtype == torch.float32 and torch.equal(new_images, old_images)
            assert torch.equal(new_labels, old_labels)
            erased += int((old_images == 0).all(dim=1).flatten(1).any(dim=1).sum())
    assert (erased > 0) == bool(random_erase)  # the erasing did happen, and matched
    if cache:
        assert new.decoded is not None and new.decoded.buffer is not None and new.decoded.shapes.all()


def test_evaluation_batches_equal_todays(samples):
    new = decoded(data.ImageDataset(samples, data.eval_transform(PREP, uint8=True), PREP.resize_size))
    old = data.ImageDataset(samples, todays_eval_transform(), PREP.resize_size)
    batches = data.DeviceBatches(loader(new), data.Normalise(PREP.mean, PREP.std, torch.device("cpu")))
    for (old_images, _), (new_images, _) in zip(loader(old), batches, strict=True):
        assert torch.equal(new_images, old_images)
    assert torch.equal(data.eval_transform(PREP)(Image.open(samples[2][0])),
                       todays_eval_transform()(Image.open(samples[2][0]).convert("RGB")))


def test_decoded_images_are_load_rgbs_pixels_in_one_buffer(samples):
    from imgclf.preprocessing import load_rgb

    images = data.DecodedImages.measure([p for p, _ in samples], PREP.resize_size, threads=2)
    assert images[0] is None  # nothing decoded before fill
    images.fill(threads=2)
    images.fill(threads=2)  # once only
    assert images.buffer is not None and images.buffer.nbytes == images.nbytes
    drafted = 0
    for i, (path, _) in enumerate(samples):
        expected = np.asarray(load_rgb(path, PREP.resize_size))
        assert np.array_equal(np.asarray(images[i]), expected), path.name
        drafted += expected.shape[1] < Image.open(path).width
    assert drafted >= 2  # the large JPEGs were decoded at a reduced scale, as load_rgb does it
    assert tuple(images.shapes[-2]) == (100, 60)  # 200 x 120 drafted to 100 x 60, then EXIF-rotated: 60 wide


def test_normalise_equals_totensor_then_normalize():
    """Tolerance: none on the CPU (the same float32 operations in the same order), in either memory format."""
    pixels = torch.randint(0, 256, (5, 3, 17, 23), dtype=torch.uint8)
    expected = torch.stack([transforms.Normalize(PREP.mean, PREP.std)(transforms.ToTensor()(
        Image.fromarray(p.permute(1, 2, 0).numpy()))) for p in pixels])
    for fmt in (torch.preserve_format, torch.channels_last):
        out = data.Normalise(PREP.mean, PREP.std, torch.device("cpu"), fmt)(pixels)
        assert torch.equal(out, expected)
    assert data.Normalise(PREP.mean, PREP.std, torch.device("cpu"), torch.channels_last)(pixels).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        data.Normalise(PREP.mean, PREP.std, torch.device("cpu"))(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normalise_on_the_gpu_equals_the_cpu_within_float32_rounding():
    """Stated tolerance on CUDA: 1e-6 absolute (a few float32 ulps of values within +-3); IEEE division is expected
    to make it exact, which the second assertion reports if not."""
    pixels = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    cpu = data.Normalise(PREP.mean, PREP.std, torch.device("cpu"))(pixels)
    gpu = data.Normalise(PREP.mean, PREP.std, torch.device("cuda"), torch.channels_last)(pixels.pin_memory()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)
    assert torch.equal(gpu, cpu)


def test_erase_sets_each_box_to_zero():
    images = torch.ones(3, 3, 5, 6)
    boxes = torch.tensor([[1, 2, 2, 3], [0, 0, 0, 0], [4, 5, 1, 1]])
    data.erase(images, boxes)
    assert images[0, :, 1:3, 2:5].eq(0).all() and images[0].eq(0).sum() == 3 * 6
    assert images[1].eq(1).all()
    assert images[2, :, 4, 5].eq(0).all() and images[2].eq(0).sum() == 3


def fake_memory(monkeypatch, total: float, available: float) -> None:
    memory = type("Memory", (), {"total": int(total), "available": int(available)})
    monkeypatch.setattr(data.psutil, "virtual_memory", lambda: memory)


def test_the_cache_falls_back_to_decoding_every_epoch_when_over_the_budget(samples, monkeypatch, caplog):
    need = data.DecodedImages.measure([p for p, _ in samples], PREP.resize_size, 1).nbytes
    fake_memory(monkeypatch, total=need * 3, available=need * 10)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes: each may hold 0.5 x 3 x need / 2 < need
    train = data.ImageDataset(samples, data.eval_transform(PREP, uint8=True), PREP.resize_size)
    with caplog.at_level(logging.INFO, logger="imgclf.data"):
        data.plan_decoded_cache("auto", 0.5, {"train": train}, threads=2)
    assert train.decoded is None
    line = next(r.getMessage() for r in caplog.records if "decoded cache off for train" in r.getMessage())
    assert f"{len(samples)} images decode to {need / 1e9:.2f} GB" in line and "/ 2 training process(es)" in line
    with pytest.raises(HyperparameterError, match="decoded-cache=on: train: .* raise decoded-cache-memory"):
        data.plan_decoded_cache("on", 0.5, {"train": train}, threads=2)


def test_the_budget_takes_train_first_then_valid_if_it_still_fits(samples, monkeypatch):
    need = data.DecodedImages.measure([p for p, _ in samples[:4]], PREP.resize_size, 1).nbytes
    fake_memory(monkeypatch, total=need * 3, available=need * 1.2)  # available, not the share, limits it
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    train, valid = (data.ImageDataset(samples[:4], data.eval_transform(PREP, uint8=True), PREP.resize_size)
                    for _ in range(2))
    data.plan_decoded_cache("on", 0.5, {"train": train, "valid": valid}, threads=2)
    assert train.decoded is not None and train.decoded.nbytes == need and valid.decoded is None
    data.plan_decoded_cache("off", 0.5, {"valid": valid}, threads=2)
    assert valid.decoded is None


def test_device_batches_need_an_image_dataset():
    with pytest.raises(TypeError, match="ImageDataset"):
        data.DeviceBatches(loader(torch.utils.data.TensorDataset(torch.zeros(2))),
                           data.Normalise(PREP.mean, PREP.std, torch.device("cpu")))


def test_an_image_whose_decoded_size_differs_from_its_header_is_read_from_its_file(samples, monkeypatch):
    images = data.DecodedImages(
        [p for p, _ in samples[:2]], PREP.resize_size,
        [data.decoded_nbytes(samples[0][0], PREP.resize_size), 7])  # the second entry is the wrong size
    images.fill(threads=1)
    assert images[0] is not None and images[1] is None
    dataset = data.ImageDataset(samples[:2], lambda img: np.asarray(img), PREP.resize_size)
    dataset.decoded = images
    assert np.array_equal(dataset[1][0], np.asarray(data.load_rgb(samples[1][0], PREP.resize_size)))
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    assert data.decoded_nbytes(io.BytesIO(buf.getvalue())) == 48
