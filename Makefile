# Everything a user runs. `make demo` and `make test` set up the environment themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)/code

.PHONY: help install system-deps test test-unit lint demo clean build push audit lock local-train local-serve local-predict test-images base-image \
	build-train-gpu-cu128 push-train-gpu-cu128 \
	report-screenshot ui-screenshot

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# uv, setuptools and wheel, hash-checked (requirements/lock/build.txt): what installs and makes the locks.
BUILD_TOOLS = $(BIN)/pip install -q --no-deps --require-hashes -r requirements/lock/build.txt

# The development environment is requirements/lock/dev.txt (make lock: requirements/dev.txt resolved with the
# versions the image locks agree on), installed by uv: 74-96 s here where pip took 282 s (docs/development.md).
# uv does not read pip's configuration: scripts/pip_index_args.py passes pip's index settings on (a mirror or a
# local index stays in use).
$(VENV)/.installed: $(BIN)/python requirements/lock/build.txt requirements/lock/dev.txt pyproject.toml
	$(BUILD_TOOLS)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps --require-hashes --compile-bytecode \
		$$($(BIN)/python scripts/pip_index_args.py) -r requirements/lock/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependencies and the package

# The programs outside Python that the tests need (scripts/system_deps.sh): Chromium (the browser tests) and Java
# (multi-model-server). Missing ones are apt-installed where apt-get and root or passwordless sudo are; elsewhere
# it stops, before any test runs, naming them and the command that installs them. SYSTEM_DEPS= skips the check.
SYSTEM_DEPS ?= chromium java
system-deps: ## install (apt-get, as root or with sudo) or name the programs the tests need: Chromium, Java
	@scripts/system_deps.sh $(SYSTEM_DEPS)

# The tiers are folders (tests/conftest.py): unit (in-process), integration (real processes), images.
# `make test` runs on every core (pytest-xdist; TEST_JOBS=0 runs in one process): the integration tests wait on
# servers and scripts about half the time. Whole files go to one worker, so a module's fixtures run once, in the
# order tests/conftest.py sorts them (longest first), not xdist's (most tests first).
TEST_JOBS ?= auto
test: system-deps install ## the unit and integration tests (what CI runs before the image tests)
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests/unit tests/integration

test-unit: install ## the in-process tests: no process, no server, no network (seconds)
	$(BIN)/pytest -q tests/unit

lint: install ## ruff on the code, scripts and tests; mypy on the package (pyproject.toml [tool.mypy])
	$(BIN)/ruff check code scripts tests containers
	$(BIN)/mypy

DATA ?=
MODEL ?=
WEIGHTS ?=
demo: SYSTEM_DEPS = java
demo: system-deps install ## sample data -> train -> serve -> predict, on this machine (DATA=, MODEL=, WEIGHTS= for your own)
	$(BIN)/python scripts/demo.py $(if $(DATA),--data $(DATA)) $(if $(MODEL),--model $(MODEL)) $(if $(WEIGHTS),--weights $(WEIGHTS))

# ---- Images: build, lock, push, and the `docker run` local mode (docs/images.md) --------------------------
# The engine: DOCKER=docker or DOCKER=podman; by default docker when a Docker API answers, else podman.
DOCKER ?= $(shell if docker info >/dev/null 2>&1 || ! command -v podman >/dev/null; then echo docker; else echo podman; fi)
ALL_IMAGES := train-cpu train-gpu serve serve-gpu
IMAGES ?= $(ALL_IMAGES)
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
# The base image (python:3.11-slim-bookworm from Docker Hub); without Docker Hub: make base-image, then
# PYTHON_IMAGE=$(BASE_IMAGE).
PYTHON_IMAGE ?=
BASE_IMAGE ?= localhost/imgclf-python:3.11-bookworm
# The CPU training image's torch (the serving image has none): cpu (PyTorch's CPU index, the default) or pypi (PyPI's CUDA build, several GB larger,
# for builds that cannot reach download.pytorch.org).
TORCH_SOURCE ?= cpu
# The GPU training image's build (docs/images.md; imgclf.instances.GPU_BUILDS): cu130 (PyPI's torch 2.14.1 on CUDA
# 13.0: NVIDIA driver R580 or newer) or cu128 (PyPI's torch 2.10.0 on CUDA 12.8: R525 or newer, so also SageMaker's
# R535 and R550 hosts). A cu128 build is tagged TAG-cu128 and latest-cu128 in the same repository, so that
# scripts/train.py --image-tag latest-cu128 picks it: make build-train-gpu-cu128 push-train-gpu-cu128. It is not
# part of make build or make test-images (another 5.5 GB torch layer and several minutes in CI).
TRAIN_GPU_CUDA ?= cu130
gpu_torch_source_cu130 := pypi
gpu_torch_source_cu128 := pypi-cu128
gpu_tag_suffix := $(if $(filter-out cu130,$(TRAIN_GPU_CUDA)),-$(TRAIN_GPU_CUDA))
tag_suffix_train-gpu = $(gpu_tag_suffix)
PLATFORM ?= linux/amd64
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SOURCE_URL ?= $(or $(shell git config --get remote.origin.url 2>/dev/null),unknown)
dockerfile_train-cpu := containers/train/Dockerfile.cpu
dockerfile_train-gpu := containers/train/Dockerfile.gpu
dockerfile_serve := containers/serve/Dockerfile
# The GPU serving image: the serving Dockerfile on the GPU lock (onnxruntime-gpu, CUDA 13 and cuDNN 9 wheels: NVIDIA
# driver R580 or newer); it serves on the CPU where no GPU is visible.
dockerfile_serve-gpu := containers/serve/Dockerfile
build_args_serve-gpu := --build-arg LOCK=serve-gpu --build-arg DEVICE=GPU --build-arg TITLE=imgclf-serve-gpu

# BUILD_JOBS=3 runs the builds side by side, each one's output shown whole when it ends: 343-348 s instead of 461 s
# twice here, but 731 s in a CI run and over 8 minutes once (podman's API service spins a core while the docker
# CLI streams builds), so one at a time, the output as it comes, stays the default (docs/development.md).
BUILD_JOBS ?= 1
build: ## build the images (all four, or IMAGES=serve; or make build-train-cpu), BUILD_JOBS at a time
	@$(MAKE) --no-print-directory -j$(BUILD_JOBS) $(if $(filter-out 1,$(BUILD_JOBS)),--output-sync=target) \
		$(addprefix build-,$(IMAGES))

# With TORCH_SOURCE=pypi both training images start from one torch stage (5.5 GB): built first, once, so that
# the two builds do not each install it side by side.
ifeq ($(TORCH_SOURCE),pypi)
build-train-cpu build-train-gpu: build-torch-stage
endif
build-torch-stage:
	$(DOCKER) build --platform $(PLATFORM) -f $(dockerfile_train-gpu) --target torch \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .

build-train-gpu-cu128: ## the GPU training image's cu128 build (R525+ drivers, e.g. R535, R550): TAG-cu128, latest-cu128
	@$(MAKE) --no-print-directory build-train-gpu TRAIN_GPU_CUDA=cu128

build-%:
	@test -n "$(dockerfile_$*)" || { echo "error: no image '$*'; images: $(ALL_IMAGES)"; exit 2; }
	@test -n "$(gpu_torch_source_$(TRAIN_GPU_CUDA))" || { echo "error: TRAIN_GPU_CUDA=$(TRAIN_GPU_CUDA): cu130 or cu128"; exit 2; }
	$(DOCKER) build --platform $(PLATFORM) -f $(dockerfile_$*) -t $(IMAGE_PREFIX)-$*:$(TAG)$(tag_suffix_$*) -t $(IMAGE_PREFIX)-$*:latest$(tag_suffix_$*) \
		--build-arg VERSION=$(VERSION) --build-arg GIT_SHA=$(or $(shell git rev-parse --verify -q HEAD 2>/dev/null),unknown) \
		--build-arg SOURCE=$(SOURCE_URL) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
		$(if $(filter train-cpu,$*),--build-arg TORCH_SOURCE=$(TORCH_SOURCE)) \
		$(if $(filter train-gpu,$*),--build-arg TORCH_SOURCE=$(gpu_torch_source_$(TRAIN_GPU_CUDA))) \
		$(if $(and $(PRETRAINED_MODELS),$(filter train-%,$*)),--build-arg PRETRAINED_MODELS="$(PRETRAINED_MODELS)") \
		$(build_args_$*) .

base-image: ## a Python 3.11 base image from Debian's packages (debootstrap, root): builds without Docker Hub
	DOCKER=$(DOCKER) containers/base/build.sh $(BASE_IMAGE)

ALLOW_CRITICAL ?=
push: install ## push the images to ECR (REGION=, ACCOUNT=, PROFILE=, TAG=, KEEP_IMAGES=, DRY_RUN=1, ALLOW_CRITICAL=1)
	@test -z "$(gpu_tag_suffix)" || test "$(strip $(IMAGES))" = train-gpu || { echo "error: TRAIN_GPU_CUDA=$(TRAIN_GPU_CUDA)" \
		"pushes the train-gpu image alone: make push-train-gpu-$(TRAIN_GPU_CUDA)"; exit 2; }
	$(BIN)/python scripts/push_images.py $(IMAGES) --prefix $(IMAGE_PREFIX) --tag $(TAG)$(gpu_tag_suffix) --tag latest$(gpu_tag_suffix) \
		--keep $(KEEP_IMAGES) --docker "$(DOCKER)" $(if $(REGION),--region $(REGION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
		$(if $(PROFILE),--profile $(PROFILE)) $(if $(DRY_RUN),--dry-run) $(if $(ALLOW_CRITICAL),--allow-critical)

push-train-gpu-cu128: ## push the cu128 build (make build-train-gpu-cu128) to the train-gpu repository: TAG-cu128, latest-cu128
	@$(MAKE) --no-print-directory push IMAGES=train-gpu TRAIN_GPU_CUDA=cu128

audit: install ## known vulnerabilities: pip-audit over the image locks (exit 3: service unreachable), MMS's Java libraries
	$(BIN)/python scripts/audit.py

# requirements/lock/: one fully pinned, hashed set per image and one for the development environment (dev.txt),
# resolved from requirements/*.txt on PyPI.
# serve-gpu.txt: requirements/serve-gpu.txt without onnxruntime (lock/cpu-only.txt), every version the CPU serving
# lock's and the CUDA wheels the GPU training lock's (torch-pypi.txt), so that they install from the same caches.
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--generate-hashes --custom-compile-command "make lock"
CPU_ONLY = --excludes requirements/lock/cuda-only.txt --no-emit-package torch --no-emit-package torchvision
lock: $(BIN)/python ## regenerate requirements/lock/ from requirements/*.txt (needs PyPI)
	$(BUILD_TOOLS)
	$(UV_COMPILE) requirements/lock/build.in -o requirements/lock/build.txt
	$(UV_COMPILE) requirements/train.txt -c requirements/lock/build.txt -o requirements/lock/train-gpu.txt
	$(UV_COMPILE) requirements/train.txt -c requirements/lock/build.txt $(CPU_ONLY) -o requirements/lock/train-cpu.txt
	$(UV_COMPILE) requirements/serve.txt -c requirements/lock/build.txt $(CPU_ONLY) -o requirements/lock/serve-cpu.txt
	$(BIN)/python containers/torch_locks.py requirements/base.txt requirements/lock/train-gpu.txt requirements/lock
	$(UV_COMPILE) requirements/serve-gpu.txt -c requirements/lock/build.txt --excludes requirements/lock/cpu-only.txt \
		-c requirements/lock/serve-cpu.txt -c requirements/lock/torch-pypi.txt -o requirements/lock/serve-gpu.txt
	$(UV_COMPILE) requirements/train.txt --overrides requirements/torch-cu128.txt -c requirements/lock/build.txt \
		-c requirements/lock/train-cpu.txt -o requirements/lock/train-gpu-cu128.txt
	$(BIN)/python containers/torch_locks.py --variant requirements/lock/train-gpu-cu128.txt \
		requirements/lock/train-cpu.txt requirements/lock/torch-pypi-cu128.txt
	$(BIN)/python containers/torch_locks.py --agreed requirements/lock/train-gpu.txt requirements/lock/serve-cpu.txt \
		> $(VENV)/image-locks-agree-on.txt
	$(UV_COMPILE) requirements/dev.txt -c requirements/lock/build.txt -c $(VENV)/image-locks-agree-on.txt \
		-o requirements/lock/dev.txt

# Local mode with Docker, as in AWS's bring-your-own examples: a /opt/ml tree on this machine, mounted.
# The containers run detached with their logs followed (containers/run_container.sh): Ctrl-C stops them as
# SageMaker does (SIGTERM, SIGKILL 30 s later), then removes them. RUN_OPTS: more `docker run` options (e.g. a --label).
LOCAL_TREE ?= demo-output/docker/opt_ml
LOCAL_TRAIN_IMAGE ?= train-cpu
LOCAL_TAG ?= latest
PORT ?= 8080
SHM_SIZE ?= 2g
NETWORK ?=
RUN_OPTS ?=
HPS ?= model=resnet18 pretrained=false image-size=64 epochs=2 batch-size=16 num-workers=0
PREDICT_FILE ?= $(firstword $(wildcard $(LOCAL_TREE)/input/data/test/*/*))
CONTENT_TYPE ?= application/x-image
local-train: install ## run IMAGE train over LOCAL_TREE (DATA= your ImageFolder, else sample data; HPS=; NETWORK=none)
	$(BIN)/python containers/local_tree.py $(LOCAL_TREE) --clean $(if $(DATA),--data $(DATA)) $(addprefix --hp ,$(HPS))
	containers/run_container.sh "$(DOCKER)" $(RUN_OPTS) --shm-size $(SHM_SIZE) --hostname algo-1 $(if $(NETWORK),--network $(NETWORK)) \
		$(if $(filter train-gpu,$(LOCAL_TRAIN_IMAGE)),--gpus all) -v $(abspath $(LOCAL_TREE)):/opt/ml \
		$(IMAGE_PREFIX)-$(LOCAL_TRAIN_IMAGE):$(LOCAL_TAG) train

# The port is published on 127.0.0.1 only: the server (and MMS's management API on the same port) is not for the network.
local-serve: ## run IMAGE serve on 127.0.0.1:PORT with LOCAL_TREE/model mounted read-only (Ctrl-C stops it)
	@test -f $(LOCAL_TREE)/model/config.json || { echo "error: no model in $(LOCAL_TREE)/model: run make local-train first"; exit 2; }
	containers/run_container.sh "$(DOCKER)" $(RUN_OPTS) -p 127.0.0.1:$(PORT):8080 -v $(abspath $(LOCAL_TREE))/model:/opt/ml/model:ro \
		$(IMAGE_PREFIX)-serve:$(LOCAL_TAG) serve

local-predict: ## POST PREDICT_FILE to the local-serve server's /invocations
	@test -n "$(PREDICT_FILE)" || { echo "error: no image: pass PREDICT_FILE=photo.jpg"; exit 2; }
	curl -sS --fail-with-body -H "Content-Type: $(CONTENT_TYPE)" --data-binary @$(PREDICT_FILE) \
		http://127.0.0.1:$(PORT)/invocations
	@echo

# The profiler report of a small sample run, rendered by headless Chromium (Debian: apt-get install chromium).
REPORT_OUT ?= demo-output/report
report-screenshot: install ## train a small sample run, screenshot its profiler report to REPORT_OUT/profiler-report.png
	$(BIN)/python scripts/report_screenshot.py $(REPORT_OUT)

# The try-a-model page (python -m imgclf.local serve --ui) answering for a sample photo: the README's picture.
UI_MODEL ?=
ui-screenshot: install ## screenshot the try-a-model page to docs/images/try-a-model.png (UI_MODEL=model.tar.gz, else a sample run)
	$(BIN)/python scripts/ui_screenshot.py $(REPORT_OUT) $(if $(UI_MODEL),--model $(UI_MODEL))

test-images: install ## build the four images, run the image tests on them, remove them (docker or podman)
	IMGCLF_IMAGE_TESTS=1 DOCKER=$(DOCKER) PYTHON_IMAGE=$(PYTHON_IMAGE) TORCH_SOURCE=$(TORCH_SOURCE) \
		$(BIN)/pytest -q tests/images

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# ---- Benchmarks (README: "Performance"). `make test` runs each with --quick (tests/integration/test_bench_smoke.py). --
# Every scripts/bench/*.py that is a benchmark (not a helper); gpu.py needs a GPU: make bench-gpu.
BENCH_HELPERS := common reference naive_server gpu images
BENCHES ?= $(filter-out $(BENCH_HELPERS),$(basename $(notdir $(wildcard scripts/bench/*.py))))
.PHONY: bench bench-gpu bench-images
bench: install ## run the benchmarks (BENCHES="train_throughput serving" for some); JSON in bench-results/
	@mkdir -p bench-results
	@for b in $(BENCHES); do echo "== $$b" >&2; \
		$(BIN)/python scripts/bench/$$b.py > bench-results/$$b.json || exit 1; \
		sed -n '/^{$$/,$$p' bench-results/$$b.json; done

bench-images: install ## image sizes, serving cold start, container vs local-mode training (after make build)
	$(BIN)/python scripts/bench/images.py --engine "$(DOCKER)" --prefix $(IMAGE_PREFIX) --tag $(or $(LOCAL_TAG),latest)

# REAL_DATA=DIR (an ImageFolder dataset, e.g. dogImages): also train from its JPEGs through the job's DataLoader.
bench-gpu: install ## ResNet50 + ViT-B/16 bf16 training/inference images/s (on a GPU machine, < 5 minutes)
	@mkdir -p bench-results
	$(BIN)/python scripts/bench/gpu.py $(if $(REAL_DATA),--real-data "$(REAL_DATA)") > bench-results/gpu.json; \
		status=$$?; sed -n '/^{$$/,$$p' bench-results/gpu.json; exit $$status
