"""Hyperparameter schema, metric definitions and the SageMaker paths: the facts every other module reads.

Hyperparameters are kebab-case, as SageMaker passes them. The toolkit json-decodes each value, falling back
to the raw string, so "0.01" arrives as 0.01 and "vgg16" as "vgg16"; `parse_hyperparameters` checks names,
types, ranges and choices and returns a frozen `Hyperparameters`: one typed attribute per schema entry, in
snake_case (hp.batch_size). `to_dict` gives them back under the schema's names (what metrics.json records).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from imgclf.errors import HyperparameterError
from imgclf.preprocessing import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

FreezeMode = Literal["head", "none", "head-then-all"]
OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["cosine", "step", "none"]
AmpMode = Literal["auto", "bf16", "fp16", "off"]
OnnxExporter = Literal["auto", "dynamo", "torchscript"]  # imgclf.export.EXPORTERS, tried in order by auto
AutoOnOff = Literal["auto", "on", "off"]
AugmentMode = Literal["none", "flip", "trivialaugment", "randaugment"]
SelectBy = Literal["accuracy", "loss"]
FREEZE_MODES: tuple[str, ...] = get_args(FreezeMode)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
AMP_MODES: tuple[str, ...] = get_args(AmpMode)
AUTO_ON_OFF: tuple[str, ...] = get_args(AutoOnOff)
AUGMENTS: tuple[str, ...] = get_args(AugmentMode)
TIMM_PREFIX = "timm/"  # model=timm/<name>[.<tag>]: a timm model (imgclf.models)

# The rule catalogue's names, in its order: imgclf.debugging.rules.RULES, which refuses to load unless it has a class
# for each. Here because the schema's help and the rule metrics name them, and serving, which reads this module,
# must not load the debugging code.
RULE_NAMES = (
    "loss_not_decreasing", "overfit", "overtraining", "poor_weight_initialization", "vanishing_gradient",
    "exploding_tensor", "low_gpu_utilization", "cpu_bottleneck", "dataloader_wait", "step_outlier",
    "max_initialization_time", "io_bottleneck", "gpu_memory_increase", "batch_size", "load_balancing",
)


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None


# The one schema: README's table, the tuning scripts and validation all read it.
SCHEMA: tuple[Param, ...] = (
    Param("lr", float, 0.001, "learning rate of the new head (and of the backbone, times backbone-lr-factor)",
          min=1e-7, max=10.0),
    Param("batch-size", int, 32, "images per optimizer step", min=1, max=4096),
    Param("epochs", int, 7, "training epochs", min=1, max=1000),
    Param("model", str, "vgg16", "any torchvision classification model (vgg16, resnet50, efficientnet_v2_s, "
          "convnext_tiny, vit_b_16, ...) or any timm model as timm/<name>[.<tag>] (timm/convnext_nano, "
          "timm/vit_base_patch16_224.augreg_in21k_ft_in1k, ...)"),
    Param("pretrained", bool, True, "start from ImageNet weights (weights channel, TORCH_HOME or Hugging Face hub "
          "cache, or download)"),
    Param("download-weights", bool, False, "let torchvision or timm download pretrained weights when none are "
          "found offline (needs internet; off so that a missing file is a clear error)"),
    Param("freeze", str, "auto", "head: train only the new head; none: fine-tune everything; head-then-all: "
          "head for head-epochs, then everything; auto = head with pretrained weights, none without (a head on "
          "random features learns little)", choices=("auto", *FREEZE_MODES)),
    Param("head-epochs", int, 1, "with freeze=head-then-all: epochs that train only the head", min=0, max=1000),
    Param("backbone-lr-factor", float, 1.0, "backbone learning rate = lr x this factor when it trains",
          min=0.0, max=100.0),
    Param("optimizer", str, "adam", "optimizer", choices=OPTIMIZERS),
    Param("momentum", float, 0.9, "momentum for sgd", min=0.0, max=1.0),
    Param("weight-decay", float, 0.0, "weight decay (L2 for adam/sgd, decoupled for adamw)", min=0.0, max=1.0),
    Param("label-smoothing", float, 0.0, "label smoothing of the cross-entropy loss", min=0.0, max=0.99),
    Param("lr-scheduler", str, "cosine", "learning-rate decay after the warmup, stepped every optimizer step: "
          "cosine to near 0 at the last step; step: x0.1 at each third; none: constant", choices=SCHEDULERS),
    Param("head-solver", str, "auto", "how a head trains on a frozen backbone: lbfgs = fitted once on the cached "
          "features as an L2-regularised logistic regression, the best linear classifier of those features, its "
          "regularisation chosen on the validation split (seconds; epochs and lr do not apply); sgd = the epochs "
          "of the training loop; auto = lbfgs with freeze=head and the feature cache on (and no model-ema), sgd "
          "otherwise", choices=("auto", "lbfgs", "sgd")),
    Param("warmup-epochs", float, 0.0, "linear learning-rate warmup over this many epochs (fractions allowed), "
          "stepped every optimizer step: lr is reached at the last warmup step", min=0.0, max=1000.0),
    Param("model-ema", bool, False, "keep an exponential moving average of the weights, updated every optimizer "
          "step; the average is what is validated, selected, saved, exported and served"),
    Param("model-ema-decay", float, 0.999, "with model-ema: ema = decay x ema + (1 - decay) x weights after each "
          "step (about 1/(1 - decay) steps of memory: 0.999 for short runs, 0.9998 for ImageNet-length ones; 1 would "
          "never move from the first weights)", min=0.0, max=0.99999),
    Param("drop-path", float, 0.0, "timm models: stochastic depth rate, the share of residual blocks skipped per "
          "sample in training (0.1 is usual for ViT-B or ConvNeXt-T fine-tuning)", min=0.0, max=0.9),
    Param("layer-decay", float, 1.0, "timm models: layer-wise learning-rate decay, each block down from the head "
          "at this factor of the one above (0.65-0.75 for ViT fine-tuning); 1 = off", min=0.01, max=1.0),
    Param("accumulate-steps", int, 1, "batches whose gradients add up before each optimizer step: a batch-size x N "
          "batch in the memory of one", min=1, max=1024),
    Param("image-size", int, 0, "side of the square crop the model sees (pixels); 0 = the model's own: timm's "
          "data config for timm/ models, 224 for torchvision models", min=0, max=MAX_IMAGE_SIZE),
    Param("augment", str, "auto", "training-split augmentation: flip = random resized crop + horizontal flip; "
          "trivialaugment / randaugment = that, then torchvision's TrivialAugmentWide / RandAugment; none; auto = "
          "none with freeze=head (the backbone's features are then cached: epochs after the first take "
          "milliseconds), flip otherwise; true / false = flip / none", choices=("auto", "true", "false", *AUGMENTS)),
    Param("random-erase", float, 0.0, "probability of erasing a random rectangle of each training image (torchvision's "
          "RandomErasing, after normalisation)", min=0.0, max=1.0),
    Param("mixup", float, 0.0, "Mixup's alpha: blend pairs of training images and their labels (0 = off; 0.2 is "
          "usual)", min=0.0, max=10.0),
    Param("cutmix", float, 0.0, "CutMix's alpha: paste a patch of one training image into another, labels in "
          "proportion (0 = off; 1.0 is usual); with mixup too, each batch gets one of the two", min=0.0, max=10.0),
    Param("mixup-prob", float, 1.0, "share of the training batches that mixup/cutmix mixes", min=0.0, max=1.0),
    Param("mixup-off-epoch", int, 0, "from this epoch on (1-based), no more mixing: the last epochs see clean "
          "images; 0 = mix to the end", min=0),
    Param("num-workers", int, -1, "DataLoader worker processes; -1 = the CPUs the job may use (its CPU affinity), "
          "shared between the host's training processes, less one each for the process itself", min=-1, max=256),
    Param("seed", int, 42, "seed for weights of the new head, data order and augmentation", min=0, max=2**32 - 1),
    Param("select-by", str, "accuracy", "the epoch kept: accuracy = best validation accuracy, ties broken by the "
          "lower validation loss; loss = lowest validation loss", choices=get_args(SelectBy)),
    Param("early-stopping-patience", int, 0, "stop after this many epochs without a better epoch (by select-by); "
          "0 = off", min=0),
    Param("log-interval", int, 10, "a progress line every N training steps, with the time left in the epoch and "
          "the mean loss (a progress bar instead on a terminal); 0 = off", min=0),
    # Debugging and profiling (imgclf.debugging): tensor collection, rules, system monitor, profiler, report.
    Param("debugging", bool, True, "tensor collection, rules, system monitor, profiler capture and the profiler "
          "report; false turns all of it off"),
    Param("rules", str, "all", f"rules to evaluate: all, none, or a comma list ({', '.join(RULE_NAMES)})"),
    Param("rules-config", str, "", 'rule parameters: a JSON object or JSON file path, e.g. {"overfit": '
          '{"ratio_threshold": 0.5, "stop": true}}'),
    Param("rules-stop", str, "", "comma list of rules that stop the job when they find an issue"),
    Param("collect-train-interval", int, 10, "save the training loss every N steps", min=1),
    Param("collect-eval-interval", int, 1, "save the evaluation loss every N evaluation steps", min=1),
    Param("collect-stats-interval", int, 100, "save weight/gradient norms and activation statistics every N "
          "training steps (and at step 0)", min=1),
    Param("monitor-interval-ms", int, 500, "system monitor sampling interval (ms)", min=50, max=60000),
    Param("profiler-steps", int, 10, "training steps captured by torch.profiler; 0 = off", min=0, max=1000),
    Param("profiler-start-step", int, 5, "first training step of the profiler capture (after warm-up); a capture "
          "ends with its epoch", min=0),
    Param("init-scale", float, 1.0, "debugging aid: multiply the initial conv/linear weights by this factor "
          "(1 = unchanged); shows what poor_weight_initialization catches", min=1e-6, max=1e6),
    # Throughput (imgclf.training.accel, imgclf.training.features): `auto` picks what is faster where the job runs.
    Param("amp", str, "auto", "mixed precision: auto = bf16 on GPUs and CPUs with native bf16 (fp16 on older "
          "GPUs), fp32 elsewhere; bf16/fp16 force it; off = fp32", choices=AMP_MODES),
    Param("channels-last", str, "auto", "NHWC memory format; auto = on for convolutional networks",
          choices=AUTO_ON_OFF),
    Param("compile", str, "auto", "torch.compile the model; auto = on with a GPU and a C compiler, off on CPU",
          choices=AUTO_ON_OFF),
    Param("feature-cache", str, "auto", "while the backbone is frozen, compute its features once per image and "
          "train the head on them (same metrics, epochs in milliseconds); auto = on when augment=false and the "
          "backbone stays frozen for 2+ epochs; with augment=true it falls back to the normal loop",
          choices=AUTO_ON_OFF),
    Param("export-int8", bool, False, "also write model.int8.onnx (ONNX Runtime int8, about 3x the float32 "
          "graph's throughput on CPU), kept only if it agrees with float32 on the validation images "
          "(imgclf.export); serve it with IMGCLF_SERVE_DTYPE=int8"),
    Param("onnx-exporter", str, "auto", "how model.onnx is made (imgclf.export): auto = torch.onnx's dynamo "
          "exporter, else its TorchScript one when dynamo fails or its graph does not match PyTorch; dynamo or "
          "torchscript = that one only (TorchScript's is deprecated, and about 3 s faster per export)",
          choices=get_args(OnnxExporter)),
    Param("prefetch-factor", int, 4, "batches each DataLoader worker prepares ahead", min=1, max=64),
    Param("decoded-cache", str, "auto", "keep the training images (and the validation images, if they fit too) "
          "decoded in RAM, as uint8 at the JPEG draft size, after one first pass instead of decoding every image every "
          "epoch (same batches); auto = when they fit decoded-cache-memory, else decode every epoch (one log line "
          "with the figures); on = fail when the training images do not fit; off = decode every epoch",
          choices=AUTO_ON_OFF),
    Param("decoded-cache-memory", float, 0.5, "decoded-cache's budget: this share of the instance's RAM (at most "
          "what is available when the job starts), divided between the host's training processes (each holds its "
          "own copy)", min=0.01, max=0.95),
    # Distributed data-parallel training (imgclf.training.distributed): every host of the job runs this many processes.
    Param("processes-per-host", int, 0, "training processes per host (DistributedDataParallel); 0 = one per GPU, "
          "1 without a GPU; batch-size stays the global batch, split between all processes", min=0, max=64),
)
_BY_NAME = {p.name: p for p in SCHEMA}

# SageMaker metric definitions: the training loop prints lines these match; scripts read them from here.
_NUMBER = r"([0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?)"
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = tuple(
    {"Name": name, "Regex": rf"{key}={_NUMBER}"}
    for name, key in (
        ("train:loss", "train_loss"),
        ("train:accuracy", "train_accuracy"),
        ("valid:loss", "valid_loss"),
        ("valid:accuracy", "valid_accuracy"),
        ("test:loss", "test_loss"),
        ("test:accuracy", "test_accuracy"),
    )
)


def attribute_name(name: str) -> str:
    """The `Hyperparameters` attribute of a schema name: batch-size -> batch_size."""
    return name.replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """A job's validated hyperparameters (`parse_hyperparameters` makes them): one field per SCHEMA entry, in its
    order, named by `attribute_name`, of its type (a Literal of its choices); freeze and augment are resolved.
    tests/unit/test_settings.py holds the fields to the schema."""
    lr: float
    batch_size: int
    epochs: int
    model: str
    pretrained: bool
    download_weights: bool
    freeze: FreezeMode  # the schema's auto resolved: head with pretrained weights, none without
    head_epochs: int
    backbone_lr_factor: float
    optimizer: OptimizerName
    momentum: float
    weight_decay: float
    label_smoothing: float
    lr_scheduler: SchedulerName
    head_solver: Literal["auto", "lbfgs", "sgd"]  # auto resolved by the job (training.job.head_solver)
    warmup_epochs: float
    model_ema: bool
    model_ema_decay: float
    drop_path: float
    layer_decay: float
    accumulate_steps: int
    image_size: int
    augment: AugmentMode  # the schema's auto/true/false resolved: auto = none with freeze=head, else flip
    random_erase: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_off_epoch: int
    num_workers: int
    seed: int
    select_by: SelectBy
    early_stopping_patience: int
    log_interval: int
    debugging: bool
    rules: str
    rules_config: str
    rules_stop: str
    collect_train_interval: int
    collect_eval_interval: int
    collect_stats_interval: int
    monitor_interval_ms: int
    profiler_steps: int
    profiler_start_step: int
    init_scale: float
    amp: AmpMode
    channels_last: AutoOnOff
    compile: AutoOnOff
    feature_cache: AutoOnOff
    export_int8: bool
    onnx_exporter: OnnxExporter
    prefetch_factor: int
    decoded_cache: AutoOnOff
    decoded_cache_memory: float
    processes_per_host: int

    def to_dict(self) -> dict[str, Any]:
        """{schema name: value} in the schema's order, e.g. {"lr": 0.001, "batch-size": 32, ...}: what metrics.json,
        config.json, the checkpoint's fingerprint and the profiler report record."""
        return {p.name: getattr(self, attribute_name(p.name)) for p in SCHEMA}


def _coerce(param: Param, value: Any) -> Any:
    bad = HyperparameterError(
        f"hyperparameter {param.name}={value!r}: expected {param.type.__name__}"
        + (f", one of {', '.join(param.choices)}" if param.choices else "")
        + f" ({param.help}); default {param.default!r}"
    )
    if param.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if value in (0, 1):
            return bool(value)
        raise bad
    if param.type is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise bad from None
    if param.type is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):  # NaN passes every range check
            raise HyperparameterError(f"hyperparameter {param.name}={value!r}: expected a finite number")
        return number
    if isinstance(value, dict | list):  # the toolkit json-decodes values: inline JSON arrives as an object
        return json.dumps(value)
    value = str(value).strip()
    # Names and choices are case-insensitive; free text (paths, JSON) is kept as given.
    return value.lower() if param.choices or param.name == "model" else value


def parse_hyperparameters(raw: dict[str, Any]) -> Hyperparameters:
    """Validate `raw` against SCHEMA; every problem is reported at once."""
    problems = []
    unknown = sorted(k for k in raw if k not in _BY_NAME)
    if unknown:
        problems.append(
            f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(p.name for p in SCHEMA)}"
        )
    values = {p.name: p.default for p in SCHEMA}
    for name, value in raw.items():
        param = _BY_NAME.get(name)
        if param is None:
            continue
        try:
            value = _coerce(param, value)
        except HyperparameterError as e:
            problems.append(str(e))
            continue
        if param.choices and value not in param.choices:
            problems.append(f"hyperparameter {name}={value!r}: choose one of {', '.join(param.choices)}")
        elif (param.min is not None and value < param.min) or (param.max is not None and value > param.max):
            bounds = (f"between {param.min} and {param.max}" if param.min is not None and param.max is not None
                      else f"at least {param.min}" if param.min is not None else f"at most {param.max}")
            problems.append(f"hyperparameter {name}={value!r}: must be {bounds}")
        else:
            values[name] = value
    if problems:
        raise HyperparameterError("; ".join(problems))
    if 0 < values["image-size"] < MIN_IMAGE_SIZE:
        raise HyperparameterError(f"hyperparameter image-size={values['image-size']}: use 0 (the model's own size) "
                                  f"or at least {MIN_IMAGE_SIZE} pixels")
    timm_only = [f"{name}={values[name]:g}" for name, off in (("drop-path", 0.0), ("layer-decay", 1.0))
                 if values[name] != off]
    if timm_only and not str(values["model"]).startswith(TIMM_PREFIX):
        raise HyperparameterError(f"hyperparameter {', '.join(timm_only)}: timm models only (model=timm/<name>); "
                                  f"{values['model']} is a torchvision model")
    if values["layer-decay"] < 1 and values["backbone-lr-factor"] != 1:
        raise HyperparameterError("hyperparameters layer-decay and backbone-lr-factor both scale the backbone's "
                                  "learning rate: set one of them")
    if values["freeze"] == "auto":
        values["freeze"] = "head" if values["pretrained"] else "none"
    if values["augment"] in ("auto", "true", "false"):
        values["augment"] = {"true": "flip", "false": "none"}.get(values["augment"],
                                                                  "none" if values["freeze"] == "head" else "flip")
    return Hyperparameters(**{attribute_name(name): value for name, value in values.items()})


def parse_value(name: str, value: Any) -> Any:
    """One hyperparameter's value, validated and typed as `parse_hyperparameters` does it (e.g. a search range's
    bound): parse_value("batch-size", "64") -> 64."""
    return parse_hyperparameters({name: value}).to_dict()[name]


def default(name: str) -> Any:
    """The schema's default of one hyperparameter, e.g. default("model") -> "vgg16"."""
    return _BY_NAME[name].default


def hp_string(value: Any) -> str:
    """SageMaker wants every hyperparameter value as a string; the training toolkit json-decodes it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def hyperparameter_strings(raw: dict[str, Any]) -> dict[str, str]:
    """Validate `raw` with the training code's schema; return only the given ones, as SageMaker strings."""
    valid = parse_hyperparameters(raw).to_dict()
    return {name: hp_string(valid[name]) for name in sorted(raw)}


# Where SageMaker puts things in a container. SAGEMAKER_BASE_DIR moves the base (local mode, tests).
DEFAULT_BASE_DIR = "/opt/ml"
# SageMaker syncs this folder with CheckpointConfig.S3Uri; it stays here whatever the base dir is.
CHECKPOINT_DIR = "/opt/ml/checkpoints"


def base_dir() -> str:
    return os.environ.get("SAGEMAKER_BASE_DIR", DEFAULT_BASE_DIR)


def checkpoint_dir() -> str:
    """SageMaker syncs /opt/ml/checkpoints (outside the base dir); local mode moves it with IMGCLF_CHECKPOINT_DIR."""
    return os.environ.get("IMGCLF_CHECKPOINT_DIR", CHECKPOINT_DIR)


# What a training job leaves to its user. SageMaker uploads only model/ (model.tar.gz) and output/data
# (output.tar.gz) when the job ends, so everything the debugging records goes under output/data:
DATA_TENSORS = "tensors"  # scalars.jsonl, layers.jsonl
DATA_TENSORBOARD = "tensorboard"  # a copy of the live folder's event files, made when the job ends
DATA_PROFILER = "profiler"  # system.jsonl, steps.jsonl, the torch.profiler trace, top_operators.json
# While the job runs, SageMaker syncs only the checkpoint folder and the TensorBoard folder (with a
# TensorBoardOutputConfig, default LocalPath below) to S3. The live rules.json and report go to the
# TensorBoard folder: it exists for watching a job, and a spot restart does not download it back.
TENSORBOARD_DIR = "/opt/ml/output/tensorboard"


def tensorboard_dir() -> str:
    """The live folder: <base dir>/output/tensorboard (= TENSORBOARD_DIR on SageMaker); IMGCLF_TENSORBOARD_DIR
    moves it (local mode keeps it in its output folder)."""
    return os.environ.get("IMGCLF_TENSORBOARD_DIR", os.path.join(base_dir(), "output", "tensorboard"))


# Rule results as metrics: after each rule evaluation the job prints one line,
# `rules_with_issues=1 rule_overfit_issues=1 rule_exploding_tensor_issues=0 ...` (1: the rule found an issue).
RULES_METRIC = {"Name": "rules:issues", "Regex": rf"\brules_with_issues={_NUMBER}"}


def rule_metric_definitions(rule_names: Iterable[str] = RULE_NAMES) -> tuple[dict[str, str], ...]:
    """RULES_METRIC and one `rule:<name>` per rule (RULE_NAMES: those of imgclf.debugging.rules.RULES)."""
    return (RULES_METRIC, *({"Name": f"rule:{name}", "Regex": rf"\brule_{name}_issues={_NUMBER}"}
                            for name in rule_names))


def rule_metric_line(issues: dict[str, bool]) -> str:
    """The line the regexes of `rule_metric_definitions` read: {rule name: found an issue}."""
    return " ".join([f"rules_with_issues={sum(issues.values())}",
                     *(f"rule_{name}_issues={int(found)}" for name, found in issues.items())])


def markdown_tables() -> str:
    """README's hyperparameter and metric tables, generated from SCHEMA and METRIC_DEFINITIONS."""
    rows = ["| hyperparameter | default | values | what it does |", "|---|---|---|---|"]
    for p in SCHEMA:
        values = " / ".join(p.choices) if p.choices else p.type.__name__ + (
            f" {p.min:g}..{p.max:g}" if p.min is not None and p.max is not None else "")
        default = str(p.default).lower() if isinstance(p.default, bool) else p.default
        rows.append(f"| `{p.name}` | `{default}` | {values} | {p.help.replace('|', '/')} |")
    rows += ["", "| metric | regex |", "|---|---|"]
    rows += [f"| `{d['Name']}` | `{d['Regex']}` |" for d in METRIC_DEFINITIONS]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m imgclf.config: print README's tables
    print(markdown_tables())
