"""docs/sdk.md's local-mode blocks, run as written on the images `make test-images` builds: the SageMaker SDK's own
classes drive them. ModelTrainer trains on the training image, which prints every line its metric definitions read;
ModelBuilder deploys the serving image in local-container mode and predicts; Transformer runs a batch transform job
on it. Only the settings' image names are pointed at the test build. The SDK's containers (docker-compose and
docker-py start them, unlabelled) are removed after each test; the models come from the training block.

docker-compose stays attached to its containers (under podman its API service then spins a core), so the job is
tiny, and nothing here is timed. ModelBuilder's local container takes port 8080 (hard-coded in the SDK).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import tarfile
from unittest import mock

import pytest

from tests.images.conftest import ENGINE, engine, image, remove_image_containers, require_image_tests
from tests.integration.test_sdk_requests import run_example, sdk_environment

pytestmark = pytest.mark.images
require_image_tests()
SDK_PORT = 8080  # ModelBuilder's local container, and the local mode's serving_port by default


@pytest.fixture(scope="module")
def docs(images, sample_dataset, tmp_path_factory):
    """One namespace for the docs' local blocks, as a reader runs them: the settings block in a fresh folder that
    holds `sample-data`, HOME and the SDK's configuration there, the environment restored after the module."""
    work = tmp_path_factory.mktemp("sdk-docs")
    (work / "sample-data").symlink_to(sample_dataset)
    with mock.patch.dict(os.environ, sdk_environment(work / "home")):
        with contextlib.chdir(work):
            namespace = run_example("local-settings", {})
        namespace.update(TRAIN_IMAGE=image("train-cpu"), SERVE_IMAGE=image("serve"))
        yield namespace


@pytest.fixture(autouse=True)
def no_sdk_containers_left():
    """The containers of the test images a test leaves (the SDK's: docker-compose leaves them stopped) are
    removed after it, whatever happened."""
    yield
    if left := remove_image_containers():
        print(f"\nremoved containers the SDK left: {left}")


def sdk_port_free() -> None:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", SDK_PORT))
        except OSError as e:
            pytest.fail(f"port {SDK_PORT} is taken ({e}): the SDK's local mode serves there (ModelBuilder's local "
                        "container always; a LocalSession by default). Stop what holds it and rerun",
                        pytrace=False)


def running(img: str) -> list[str]:
    return [line.split()[0] for line in engine("ps", "--format", "{{.ID}} {{.Image}}").stdout.splitlines()
            if line.split()[-1].split("/")[-1] == img]


@pytest.fixture(scope="module")
def trained(docs):
    """The docs' ModelTrainer block, run once; the job's log (what the SDK streams to stdout)."""
    with contextlib.redirect_stdout(log := io.StringIO()):
        run_example("local-train", docs)
    return log.getvalue()


def class_names(docs) -> list[str]:
    with tarfile.open(docs["MODEL_TAR"]) as tar:
        return json.load(tar.extractfile("config.json"))["class_names"]


def test_model_trainer_local_mode_trains_and_prints_what_its_metric_definitions_read(docs, trained):
    """ModelTrainer starts the image with no command at all: the image's CMD trains; the SDK's metric
    definitions (the project's, as `train.py` sends them) each find their value in the job's log."""
    assert docs["MODEL_TAR"].is_file(), trained[-3000:]
    with tarfile.open(docs["MODEL_TAR"]) as tar:
        assert {"config.json", "model.onnx", "model.safetensors"} <= set(tar.getnames()), trained[-3000:]
    names = {m.name for m in docs["metrics"]}
    assert {"valid:accuracy", "valid:loss", "test:accuracy", "rules:issues", "rule:overfit"} <= names
    unread = [f"{m.name}: {m.regex}" for m in docs["metrics"] if not re.search(m.regex, trained)]
    assert not unread, f"metric definitions that find nothing in the job's log: {unread}\n{trained[-3000:]}"


@pytest.fixture(scope="module")
def deployed(docs, trained):
    """The docs' ModelBuilder block, run once: build, deploy in local-container mode, predict, delete."""
    sdk_port_free()
    run_example("local-deploy", docs)
    return docs


def test_model_builder_local_container_deploys_the_serving_image_and_predicts(deployed):
    [prediction] = deployed["answer"]["predictions"]
    top = prediction["top_k"]
    assert len(top) == 2, prediction  # the model's environment (IMGCLF_TOP_K) reached the container
    assert {t["class_name"] for t in top} <= set(class_names(deployed))
    assert 1 >= top[0]["probability"] >= top[1]["probability"] > 0
    assert deployed["model"].primary_container.image == image("serve")
    assert not running(image("serve")), f"{ENGINE}: the docs' cleanup left the endpoint's container running"


def test_transformer_local_batch_transform_on_the_serving_image(deployed):
    sdk_port_free()
    run_example("local-batch", deployed)
    photos = sorted(p.name for p in (deployed["WORK"] / "photos").iterdir())
    answers = deployed["answers"]
    assert sorted(answers) == [f"{p}.out" for p in photos] and len(photos) == 3, answers
    classes = set(class_names(deployed))
    for name, answer in answers.items():
        [prediction] = answer["predictions"]
        assert len(prediction["top_k"]) == 2, (name, answer)  # the model's environment, as for the endpoint
        assert {t["class_name"] for t in prediction["top_k"]} <= classes, (name, answer)
    assert not running(image("serve"))
