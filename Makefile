# Everything a user runs. `make demo` and `make test` set up the environment themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)/code

.PHONY: help install test lint demo clean build push lock local-train local-serve local-predict test-docker \
	report-screenshot

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<82" wheel

$(VENV)/.installed: $(BIN)/python requirements/*.txt pyproject.toml
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependencies and the package

test: install ## run the test suite (what CI runs)
	$(BIN)/pytest -q

lint: install ## ruff on the code, scripts and tests
	$(BIN)/ruff check code scripts tests containers

DATA ?=
MODEL ?=
WEIGHTS ?=
demo: install ## sample data -> train -> serve -> predict, on this machine (DATA=, MODEL=, WEIGHTS= for your own)
	$(BIN)/python scripts/demo.py $(if $(DATA),--data $(DATA)) $(if $(MODEL),--model $(MODEL)) $(if $(WEIGHTS),--weights $(WEIGHTS))

# ---- Images: build, lock, push, and the `docker run` local mode (README: "Build and push") ----------
DOCKER ?= docker
IMAGES ?= train-cpu train-gpu serve
# Local image name = ECR repository name = $(IMAGE_PREFIX)-<image> (imgclf.aws.images.REPOSITORIES).
IMAGE_PREFIX ?= imgclf
TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
REGION ?=
ACCOUNT ?=
PROFILE ?=
KEEP_IMAGES ?= 20
DRY_RUN ?=
# Space-separated torchvision names whose ImageNet weights the training images bake into TORCH_HOME.
PRETRAINED_MODELS ?=
dockerfile_train-cpu := containers/train/Dockerfile.cpu
dockerfile_train-gpu := containers/train/Dockerfile.gpu
dockerfile_serve := containers/serve/Dockerfile

build: $(addprefix build-,$(IMAGES)) ## build the images (all three, or IMAGES=serve; or make build-train-cpu)

build-%:
	@test -n "$(dockerfile_$*)" || { echo "error: no image '$*'; images: train-cpu train-gpu serve"; exit 2; }
	$(DOCKER) build -f $(dockerfile_$*) -t $(IMAGE_PREFIX)-$*:$(TAG) -t $(IMAGE_PREFIX)-$*:latest \
		$(if $(and $(PRETRAINED_MODELS),$(filter train-%,$*)),--build-arg PRETRAINED_MODELS="$(PRETRAINED_MODELS)") .

push: install ## push the images to ECR (REGION=, ACCOUNT=, PROFILE=, TAG=, KEEP_IMAGES=, DRY_RUN=1)
	$(BIN)/python scripts/push_images.py $(IMAGES) --prefix $(IMAGE_PREFIX) --tag $(TAG) --tag latest \
		--keep $(KEEP_IMAGES) $(if $(REGION),--region $(REGION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
		$(if $(PROFILE),--profile $(PROFILE)) $(if $(DRY_RUN),--dry-run)

# requirements/lock/: one fully pinned, hashed set per image, resolved from requirements/*.txt on PyPI.
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--generate-hashes --custom-compile-command "make lock"
CPU_ONLY = --excludes requirements/lock/cuda-only.txt --no-emit-package torch --no-emit-package torchvision
lock: install ## regenerate requirements/lock/ from requirements/*.txt (needs PyPI)
	$(BIN)/pip install -q -r requirements/lock/tools.txt
	$(UV_COMPILE) requirements/lock/build.in -o requirements/lock/build.txt
	$(UV_COMPILE) requirements/train.txt -c requirements/lock/build.txt -o requirements/lock/train-gpu.txt
	$(UV_COMPILE) requirements/train.txt -c requirements/lock/build.txt $(CPU_ONLY) -o requirements/lock/train-cpu.txt
	$(UV_COMPILE) requirements/serve.txt -c requirements/lock/build.txt $(CPU_ONLY) -o requirements/lock/serve-cpu.txt
	$(BIN)/python containers/torch_cpu_lock.py requirements/base.txt requirements/lock/torch-cpu.txt

# Local mode with Docker, as in AWS's bring-your-own examples: a /opt/ml tree on this machine, mounted.
LOCAL_TREE ?= demo-output/docker/opt_ml
LOCAL_TRAIN_IMAGE ?= train-cpu
LOCAL_TAG ?= latest
PORT ?= 8080
HPS ?= model=resnet18 pretrained=false image-size=64 epochs=2 batch-size=16 num-workers=0
PREDICT_FILE ?= $(firstword $(wildcard $(LOCAL_TREE)/input/data/test/*/*))
CONTENT_TYPE ?= application/x-image
local-train: install ## docker run IMAGE train over LOCAL_TREE (DATA= your ImageFolder, else sample data; HPS=)
	$(BIN)/python containers/local_tree.py $(LOCAL_TREE) --clean $(if $(DATA),--data $(DATA)) $(addprefix --hp ,$(HPS))
	$(DOCKER) run --rm $(if $(filter train-gpu,$(LOCAL_TRAIN_IMAGE)),--gpus all) -v $(abspath $(LOCAL_TREE)):/opt/ml \
		$(IMAGE_PREFIX)-$(LOCAL_TRAIN_IMAGE):$(LOCAL_TAG) train

local-serve: ## docker run IMAGE serve on localhost:PORT with LOCAL_TREE/model (Ctrl-C stops it)
	$(DOCKER) run --rm -p $(PORT):8080 -v $(abspath $(LOCAL_TREE)):/opt/ml $(IMAGE_PREFIX)-serve:$(LOCAL_TAG) serve

local-predict: ## POST PREDICT_FILE to the local-serve server's /invocations
	@test -n "$(PREDICT_FILE)" || { echo "error: no image: pass PREDICT_FILE=photo.jpg"; exit 2; }
	curl -sS --fail-with-body -H "Content-Type: $(CONTENT_TYPE)" --data-binary @$(PREDICT_FILE) \
		http://localhost:$(PORT)/invocations
	@echo

# The profiler report of a small sample run, rendered by headless Chromium (Debian: apt-get install chromium).
REPORT_OUT ?= demo-output/report
report-screenshot: install ## train a small sample run, screenshot its profiler report to REPORT_OUT/profiler-report.png
	$(BIN)/python scripts/report_screenshot.py $(REPORT_OUT)

test-docker: install ## build the CPU images and run train and serve in Docker (needs a Docker engine)
	IMGCLF_DOCKER_TESTS=1 $(BIN)/pytest -q -m docker tests/test_docker_images.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# ---- Benchmarks (README: "Performance"). `make test` runs each with --quick (tests/test_bench_smoke.py). --
# Every scripts/bench/*.py that is a benchmark (not a helper); gpu.py needs a GPU: make bench-gpu.
BENCH_HELPERS := common reference naive_server gpu
BENCHES ?= $(filter-out $(BENCH_HELPERS),$(basename $(notdir $(wildcard scripts/bench/*.py))))
.PHONY: bench bench-gpu
bench: install ## run the benchmarks (BENCHES="train_throughput serving" for some); JSON in bench-results/
	@mkdir -p bench-results
	@for b in $(BENCHES); do echo "== $$b" >&2; \
		$(BIN)/python scripts/bench/$$b.py > bench-results/$$b.json || exit 1; \
		sed -n '/^{$$/,$$p' bench-results/$$b.json; done

bench-gpu: install ## ResNet50 + ViT-B/16 bf16 training/inference images/s (on a GPU machine, < 5 minutes)
	$(BIN)/python scripts/bench/gpu.py
