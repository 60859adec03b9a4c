"""Rules that watch a training job while it runs, in the spirit of SageMaker Debugger's built-in rules.

Each rule is a dataclass: its fields are its parameters (defaults close to Debugger's), its methods read
what the training loop reports (every training and evaluation loss, the layer statistics of `collect`,
each epoch's record, the system monitor and step timer of `profiling`) and return a Finding when they see
the problem. A rule's status is NoIssuesFound until its first finding (IssuesFound, kept with the step,
epoch and evidence), NotApplicable (GPU rules without a GPU) or NotEvaluated: a rule starts NotEvaluated and
turns NoIssuesFound only once it has judged some data (`evaluated`); until then `why_not` says what it lacks.
A rule with `stop` set ends the job with RuleStop, as Debugger's StopTraining action did.

Choose rules with the hyperparameters `rules` (comma list, "all" or "none"), `rules-config` (JSON object,
inline or a file path: {"overfit": {"ratio_threshold": 0.5}, "exploding_tensor": {"stop": true}}) and
`rules-stop` (comma list). `python -m imgclf.debugging.rules` prints the rules and their parameters as Markdown.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from imgclf import config
from imgclf.errors import HyperparameterError, RuleStop

log = logging.getLogger(__name__)

NO_ISSUES, ISSUES, NOT_APPLICABLE = "NoIssuesFound", "IssuesFound", "NotApplicable"
NOT_EVALUATED = "NotEvaluated"  # the rule never had the data to judge (its reason says why): not "no issues"


@dataclass
class Finding:
    message: str
    step: int | None = None
    epoch: int | None = None
    evidence: dict = field(default_factory=dict)


def _bad(x: float, only_nan: bool = False) -> bool:
    return math.isnan(x) or (not only_nan and math.isinf(x))


def _busiest_core(sample: dict) -> float:
    """The busiest CPU core of a monitor sample (samples written before per-core sampling: the total)."""
    return max(sample.get("cpu_cores") or [sample["cpu"]])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass(kw_only=True)
class Rule:
    name: ClassVar[str]  # one of config.RULE_NAMES
    explanation: ClassVar[str]
    advice: ClassVar[str]
    profiler: ClassVar[bool] = False  # a ProfilerReport rule (the report's profiler section), not a training rule
    stop: bool = False  # end the job (RuleStop) when the rule finds an issue

    note: str = field(default="", init=False, repr=False, compare=False)  # what the last check looked at
    evaluated: bool = field(default=False, init=False, repr=False, compare=False)  # judged any data yet?
    why_not: str = field(default="not enough data yet", init=False, repr=False, compare=False)

    def parameters(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "stop"}

    # Each hook returns a Finding when the rule sees its problem; the default sees nothing.
    def train_loss(self, step: int, epoch: int, loss: float) -> Finding | None:
        return None

    def eval_loss(self, step: int, epoch: int, loss: float) -> Finding | None:
        return None

    def layer_stats(self, stats: dict) -> Finding | None:
        return None

    def epoch_end(self, history: list[dict]) -> Finding | None:
        return None

    def system(self, samples: list[dict], steps: list[dict], has_gpu: bool) -> Finding | str | None:
        """Monitor samples and step timings; may return NOT_APPLICABLE."""
        return None


@dataclass(kw_only=True)
class LossNotDecreasing(Rule):
    name = "loss_not_decreasing"
    explanation = ("Means the loss over windows of num_steps steps (`mode` TRAIN: training loss, EVAL: evaluation "
                   "loss) and compares each window with the best earlier one: an issue when a window is NaN/Inf, or "
                   "higher than the best by more than increase_threshold_percent and by more than 3 standard errors "
                   "of the batch losses (noise); with diff_percent > 0 also when a window is not diff_percent below "
                   "the best. A plateau is not an issue: a converged loss stops falling.")
    advice = ("Lower the learning rate if the loss is rising or erratic; if it has plateaued, the model may have "
              "converged (stop earlier) or need a learning-rate schedule, more capacity or unfrozen layers.")
    num_steps: int = 10
    diff_percent: float = 0.0
    increase_threshold_percent: float = 5.0
    mode: str = "TRAIN"
    NOISE_SE: ClassVar[float] = 3.0  # how many standard errors of the window means count as noise

    def __post_init__(self):
        if self.mode not in ("TRAIN", "EVAL"):
            raise HyperparameterError(f"rules-config: loss_not_decreasing.mode={self.mode!r}: use TRAIN or EVAL")
        self._window: list[float] = []
        self._best: tuple[float, int] | None = None  # (level, last step) of the best window
        self._spread: list[float] = []  # relative spread (stdev / mean) of recent windows
        self.why_not = f"fewer than num_steps={self.num_steps} {self.mode} losses"

    def train_loss(self, step, epoch, loss):
        return self._add(step, epoch, loss) if self.mode == "TRAIN" else None

    def eval_loss(self, step, epoch, loss):
        return self._add(step, epoch, loss) if self.mode == "EVAL" else None

    def _add(self, step: int, epoch: int, loss: float) -> Finding | None:
        self._window.append(loss)
        if len(self._window) < self.num_steps:
            return None
        window, self._window = self._window, []
        mean = statistics.fmean(window)
        noise = 0.0
        if math.isfinite(mean) and mean > 0:
            # Batch noise relative to the loss, pooled over recent windows (a median: one window's spread is itself
            # noisy); the noise of a window mean is that over sqrt(num_steps).
            self._spread = [*self._spread[-49:], statistics.stdev(window) / mean]
            noise = self.NOISE_SE * statistics.median(self._spread) * mean / math.sqrt(len(window))
        best, self.evaluated = self._best, True
        self.note = f"{self.mode} window ending at step {step}: mean loss {mean:.4g}"
        evidence = {"window_mean": mean, "window_noise": noise, "num_steps": self.num_steps,
                    "best_window_level": best[0] if best else None, "best_window_end_step": best[1] if best else None}
        span = f"mean {self.mode.lower()} loss over steps {step - self.num_steps + 1}-{step}"
        if not math.isfinite(mean):
            return Finding(f"{span} is {mean}", step, epoch, evidence)
        # The best level reached: the lowest window mean plus its noise (the lowest plain mean of many noisy
        # windows is biased low, and a plateau would then look like a rise).
        if best is None or mean + noise < best[0]:
            self._best = (mean + noise, step)
        if best is None:
            return None
        if mean - noise > best[0] * (1 + self.increase_threshold_percent / 100):
            return Finding(f"{span} is {mean:.4g} (+-{noise:.2g}), {100 * (mean / best[0] - 1):.0f}% above the "
                           f"best earlier window's {best[0]:.4g} (steps up to {best[1]}; threshold "
                           f"{self.increase_threshold_percent:g}%)", step, epoch, evidence)
        if self.diff_percent > 0 and mean >= best[0] * (1 - self.diff_percent / 100):
            return Finding(f"{span} is {mean:.4g}, not {self.diff_percent:g}% below the best earlier window's "
                           f"{best[0]:.4g}", step, epoch, evidence)
        return None


@dataclass(kw_only=True)
class Overfit(Rule):
    name = "overfit"
    explanation = ("Compares each epoch's validation loss with its training loss; an issue when "
                   "(valid_loss - train_loss) / train_loss exceeds ratio_threshold while the validation loss is "
                   "above its best, for patience epochs in a row. With label-smoothing the validation loss is taken "
                   "with the same smoothing as the training loss. (Debugger's rule looks at the ratio alone, which "
                   "flags nearly every run on a small dataset.)")
    advice = ("Add data or augmentation (augment=true), regularise (weight-decay, label-smoothing), freeze more "
              "layers or train fewer epochs (early-stopping-patience).")
    start_epoch: int = 1
    patience: int = 1
    ratio_threshold: float = 0.1

    def __post_init__(self):
        self._count = 0
        self._best = math.inf

    def epoch_end(self, history):
        r = history[-1]
        # Like with like: with label smoothing the training loss is smoothed, so is this validation loss.
        valid = r.get("valid_loss_smoothed", r["valid_loss"])
        best, self._best = self._best, min(self._best, valid)
        if r["epoch"] < self.start_epoch:
            return None
        self.evaluated = True
        ratio = (valid - r["train_loss"]) / max(r["train_loss"], 1e-12)
        gap = ratio > self.ratio_threshold and not valid <= best  # NaN counts as worse
        self._count = self._count + 1 if gap else 0
        self.note = f"epoch {r['epoch']}: ratio {ratio:.3g}, best valid loss {self._best:.4g}"
        if self._count < self.patience:
            return None
        return Finding(
            f"validation loss {valid:.4g} is {100 * ratio:.0f}% above training loss {r['train_loss']:.4g} "
            f"(threshold {100 * self.ratio_threshold:.0f}%) and above its best {best:.4g}, {self._count} epochs in "
            "a row", None, r["epoch"],
            {"train_loss": r["train_loss"], "valid_loss": valid, "ratio": ratio, "best_valid_loss": best,
             "label_smoothed": "valid_loss_smoothed" in r})


@dataclass(kw_only=True)
class Overtraining(Rule):
    name = "overtraining"
    explanation = ("Watches the best training and validation loss per epoch; an issue when the training loss has "
                   "not improved by delta for patience_train epochs, or the validation loss for patience_validation.")
    advice = ("Training longer no longer helps: stop earlier (early-stopping-patience, fewer epochs) or change "
              "the learning rate schedule; the best epoch's model is the one saved.")
    patience_train: int = 5
    patience_validation: int = 10
    delta: float = 0.01

    def __post_init__(self):
        self._best = {"train_loss": (math.inf, 0), "valid_loss": (math.inf, 0)}

    def epoch_end(self, history):
        r = history[-1]
        stale, self.evaluated = {}, True
        for key, patience in (("train_loss", self.patience_train), ("valid_loss", self.patience_validation)):
            best, best_epoch = self._best[key]
            if r[key] < best - self.delta:
                self._best[key] = (r[key], r["epoch"])
            elif r["epoch"] - best_epoch >= patience:
                stale[key] = (r["epoch"] - best_epoch, best, best_epoch)
        (bt, et), (bv, ev) = self._best["train_loss"], self._best["valid_loss"]
        self.note = f"epoch {r['epoch']}: best train loss {bt:.4g} (epoch {et}), valid loss {bv:.4g} (epoch {ev})"
        if not stale:
            return None
        key, (epochs, best, best_epoch) = next(iter(stale.items()))
        return Finding(f"{key.replace('_', ' ')} has not improved by {self.delta:g} for {epochs} epochs "
                       f"(best {best:.4g} in epoch {best_epoch}, now {r[key]:.4g})", None, r["epoch"],
                       {k: {"epochs_without_improvement": v[0], "best": v[1], "best_epoch": v[2]}
                        for k, v in stale.items()})


@dataclass(kw_only=True)
class PoorWeightInitialization(Rule):
    name = "poor_weight_initialization"
    explanation = ("Looks at the initial steps: the variance of activation-layer inputs across layers (max/min "
                   "above threshold: signals explode or vanish with depth), the spread of gradients (5th-95th "
                   "percentile range below distribution_range) and whether the loss falls over the first steps "
                   "(mean of the last patience of the first `steps` losses not below the mean of the first).")
    advice = ("Use the architecture's default initialisation (init-scale=1) or pretrained weights; networks "
              "without normalisation layers need He/Xavier scaling, or add BatchNorm/LayerNorm.")
    threshold: float = 10.0
    distribution_range: float = 0.001
    patience: int = 5
    steps: int = 10

    def __post_init__(self):
        self._losses: list[float] = []
        self._checked = False
        self.why_not = (f"no activation-layer inputs seen in the first {self.steps} steps (layer statistics are "
                        "taken every collect-stats-interval steps, and on the backbone when features are cached)")

    def layer_stats(self, stats):
        if self._checked or stats["step"] >= self.steps or not (stats.get("activations") or stats["gradients"]):
            return None
        self._checked = bool(stats.get("activations"))  # a cached-feature step (head only) leaves it to come
        variances = {n: a["var"] for n, a in stats.get("activations", {}).items()}
        if variances:
            self.evaluated = True
            (low_name, low), (high_name, high) = (min(variances.items(), key=lambda kv: kv[1]),
                                                  max(variances.items(), key=lambda kv: kv[1]))
            ratio = high / low if low > 0 else math.inf
            self.note = f"step {stats['step']}: activation variance ratio {ratio:.3g}"
            if not ratio <= self.threshold:  # NaN counts as an issue
                return Finding(
                    f"activation input variance differs {ratio:.3g}x across layers (threshold {self.threshold:g}): "
                    f"{low:.3g} at {low_name}, {high:.3g} at {high_name}", stats["step"], stats["epoch"],
                    {"variance_ratio": ratio, "min": [low_name, low], "max": [high_name, high]})
        spread = stats.get("gradient_percentiles")
        if spread and not spread["p95"] - spread["p5"] >= self.distribution_range:
            return Finding(
                f"gradients barely vary: 5th-95th percentile range {spread['p95'] - spread['p5']:.3g} "
                f"(threshold {self.distribution_range:g})", stats["step"], stats["epoch"], spread)
        return None

    def train_loss(self, step, epoch, loss):
        if len(self._losses) >= self.steps:
            return None
        self._losses.append(loss)
        if len(self._losses) < self.steps:
            return None
        k = min(self.patience, self.steps // 2)
        first, last = statistics.fmean(self._losses[:k]), statistics.fmean(self._losses[-k:])
        if last < first:
            return None
        return Finding(f"loss did not fall during the first {self.steps} steps (mean {first:.4g} over the first "
                       f"{k}, {last:.4g} over the last {k})", step, epoch, {"first": first, "last": last})


@dataclass(kw_only=True)
class VanishingGradient(Rule):
    name = "vanishing_gradient"
    explanation = ("An issue when the mean absolute gradient of any trained parameter tensor falls below threshold. "
                   "At the first step a gradient of exactly zero is left out: the tensor is gated by a "
                   "zero-initialised layer after it (the last BatchNorm of each block in timm's ResNets), which "
                   "the first update opens.")
    advice = ("Check the initialisation (poor_weight_initialization), use normalisation layers or residual "
              "connections, a higher learning rate for the layers concerned, or a ReLU-family activation.")
    threshold: float = 1e-7

    def layer_stats(self, stats):
        gradients = stats["gradients"]
        if not gradients:
            return None
        self.evaluated = True
        gated = {n for n, g in gradients.items() if g["mean_abs"] == 0.0} if stats["step"] == 0 else set()
        tiny = {n: g["mean_abs"] for n, g in gradients.items() if g["mean_abs"] < self.threshold and n not in gated}
        self.note = f"step {stats['step']}: {len(gradients)} gradient tensors checked" + (
            f" ({len(gated)} exactly zero at the first step: gated by a zero-initialised layer)" if gated else "")
        if not tiny:
            return None
        shown = dict(sorted(tiny.items(), key=lambda kv: kv[1])[:5])
        return Finding(f"{len(tiny)} of {len(gradients)} gradient tensors have mean |g| below "
                       f"{self.threshold:g}, e.g. " + ", ".join(f"{n}={v:.3g}" for n, v in shown.items()),
                       stats["step"], stats["epoch"], {"count": len(tiny), "smallest": shown})


@dataclass(kw_only=True)
class ExplodingTensor(Rule):
    name = "exploding_tensor"
    explanation = ("An issue when a loss (every training and evaluation step), a weight norm or an activation "
                   "statistic (every collect-stats-interval steps) is NaN or infinite. Gradients are not "
                   "judged: an fp16 loss scaler makes and skips infinite gradients by design.")
    advice = ("Lower the learning rate, clip gradients, check the input normalisation and labels, or train in "
              "bf16/fp32 instead of fp16.")
    only_nan: bool = False

    def _loss(self, mode: str, step: int, epoch: int, loss: float) -> Finding | None:
        self.note, self.evaluated = f"{mode} loss at step {step}", True
        if _bad(loss, self.only_nan):
            return Finding(f"{mode} loss is {loss} at step {step}", step, epoch, {"mode": mode, "loss": loss})
        return None

    def train_loss(self, step, epoch, loss):
        return self._loss("training", step, epoch, loss)

    def eval_loss(self, step, epoch, loss):
        return self._loss("evaluation", step, epoch, loss)

    def layer_stats(self, stats):
        bad = [f"weights {n}" for n, v in stats["weights"].items() if _bad(v, self.only_nan)]
        bad += [f"activations {n}" for n, a in stats.get("activations", {}).items()
                if _bad(a["mean"], self.only_nan) or _bad(a["var"], self.only_nan)]
        if not bad:
            return None
        return Finding(f"{len(bad)} tensors hold NaN/Inf at step {stats['step']}: " + ", ".join(bad[:5]),
                       stats["step"], stats["epoch"], {"tensors": bad[:20], "count": len(bad)})


@dataclass(kw_only=True)
class GpuSampleRule(Rule):
    """A rule on the monitor's GPU samples: NotApplicable without a GPU; the first `patience` samples (a field
    of each subclass) are skipped; `check_samples` judges the rest. All of them are ProfilerReport rules."""
    profiler = True
    if TYPE_CHECKING:
        patience: int  # each subclass's field, with its own default and place among its parameters

    def system(self, samples, steps, has_gpu):
        if not has_gpu:
            self.note = "no GPU found by NVML"
            return NOT_APPLICABLE
        seen = [s for s in samples if "gpu" in s]
        data = seen[self.patience:]
        self.note = f"{len(data)} samples analysed"
        if not data:
            self.why_not = (f"{len(seen)} monitor samples, all within patience={self.patience} (skipped as warm-up); "
                            "a longer job or a smaller patience gives it data")
            return None
        self.evaluated = True
        return self.check_samples(data)

    def check_samples(self, data: list[dict]) -> Finding | None:
        raise NotImplementedError


@dataclass(kw_only=True)
class LowGpuUtilization(GpuSampleRule):
    name = "low_gpu_utilization"
    explanation = ("Over the last `window` monitor samples (after skipping `patience`): an issue when a GPU's "
                   "95th-percentile utilisation is below threshold_p95 (underused), or above it while the 5th "
                   "percentile is below threshold_p5 (fluctuating: the GPU waits between bursts).")
    advice = ("Increase batch-size, use more num-workers, enable AMP, or pick a smaller instance; fluctuation "
              "usually means the input pipeline cannot keep up (see cpu_bottleneck, dataloader_wait).")
    threshold_p95: float = 70.0
    threshold_p5: float = 10.0
    window: int = 500
    patience: int = 1000

    def check_samples(self, data):
        data = [s["gpu"] for s in data][-self.window:]
        self.note = f"{len(data)} samples analysed"
        for gpu in range(len(data[0]) if data else 0):
            util = [d[gpu] for d in data]
            p95, p5 = _percentile(util, 95), _percentile(util, 5)
            evidence = {"gpu": gpu, "p95": p95, "p5": p5, "samples": len(util)}
            if p95 < self.threshold_p95:
                return Finding(f"GPU {gpu} underused: 95th percentile utilisation {p95:.0f}% < "
                               f"{self.threshold_p95:g}%", evidence=evidence)
            if p5 < self.threshold_p5:
                return Finding(f"GPU {gpu} utilisation fluctuates: 95th percentile {p95:.0f}%, 5th {p5:.0f}% < "
                               f"{self.threshold_p5:g}%", evidence=evidence)
        return None


@dataclass(kw_only=True)
class CpuBottleneck(GpuSampleRule):
    name = "cpu_bottleneck"
    explanation = ("Share of monitor samples (after skipping `patience`) in which the GPU is below gpu_threshold "
                   "utilisation while a CPU core is above cpu_threshold (the busiest core: one pinned core on a "
                   "many-core host hides in the total): the CPU (data loading, augmentation) starves the GPU; an "
                   "issue above threshold percent.")
    advice = ("Use more num-workers, lighter augmentation, smaller stored images (resize the dataset "
              "offline), or an instance with more vCPUs per GPU.")
    threshold: float = 50.0
    gpu_threshold: float = 10.0
    cpu_threshold: float = 90.0
    patience: int = 1000

    def check_samples(self, data):
        if not data:
            return None
        starved = sum(1 for s in data if statistics.fmean(s["gpu"]) < self.gpu_threshold
                      and _busiest_core(s) > self.cpu_threshold)
        share = 100 * starved / len(data)
        if share <= self.threshold:
            return None
        return Finding(f"in {share:.0f}% of {len(data)} samples the CPU was above {self.cpu_threshold:g}% while "
                       f"the GPU was below {self.gpu_threshold:g}%", evidence={"share": share, "samples": len(data)})


@dataclass(kw_only=True)
class IoBottleneck(GpuSampleRule):
    name = "io_bottleneck"
    explanation = ("Share of monitor samples (after skipping `patience`) in which the GPU is below gpu_threshold "
                   "utilisation while the CPU's I/O wait is above io_threshold percent: the GPU waits for storage; "
                   "an issue above threshold percent.")
    advice = ("Use the FastFile or FSx input mode, copy the data to local storage, store fewer and smaller files "
              "(resized images, shards), or use more num-workers to overlap reading with computing.")
    threshold: float = 50.0
    gpu_threshold: float = 10.0
    io_threshold: float = 50.0
    patience: int = 1000

    def check_samples(self, data):
        waiting = sum(1 for s in data if statistics.fmean(s["gpu"]) < self.gpu_threshold
                      and s["iowait"] > self.io_threshold)
        share = 100 * waiting / len(data)
        self.note = f"{len(data)} samples: {share:.0f}% with the GPU idle in I/O wait"
        if share <= self.threshold:
            return None
        return Finding(f"in {share:.0f}% of {len(data)} samples the I/O wait was above {self.io_threshold:g}% while "
                       f"the GPU was below {self.gpu_threshold:g}%", evidence={"share": share, "samples": len(data)})


@dataclass(kw_only=True)
class GpuMemoryIncrease(GpuSampleRule):
    name = "gpu_memory_increase"
    explanation = ("Means each GPU's memory utilisation over windows of `window` monitor samples (after skipping "
                   "`patience`); an issue when a window is more than `increase` percentage points above the lowest "
                   "earlier window (memory that keeps growing runs out in the end).")
    advice = ("Look for tensors kept across steps (losses stored without .item() or .detach(), growing lists, "
              "caches), or a batch size that grows; torch.cuda.memory_summary() shows who holds the memory.")
    increase: float = 5.0
    patience: int = 1000
    window: int = 10

    def check_samples(self, data):
        for gpu in range(len(data[0]["gpu_memory"])):
            memory = [s["gpu_memory"][gpu] for s in data]
            means = [statistics.fmean(memory[i:i + self.window])
                     for i in range(0, len(memory) - self.window + 1, self.window)]
            self.note = f"GPU memory over {len(means)} windows of {self.window} samples"
            for i in range(1, len(means)):
                low = min(means[:i])
                if means[i] - low > self.increase:
                    return Finding(f"GPU {gpu} memory rose from {low:.1f}% to {means[i]:.1f}% (more than "
                                   f"{self.increase:g} points)", evidence={"gpu": gpu, "lowest": low,
                                                                           "window_mean": means[i], "window": i})
        return None


@dataclass(kw_only=True)
class BatchSize(GpuSampleRule):
    name = "batch_size"
    explanation = ("Over the last `window` monitor samples (after skipping `patience`): an issue when the 95th "
                   "percentiles of CPU, GPU and GPU memory utilisation are all below their thresholds: the machine "
                   "is underused and a larger batch would use it better.")
    advice = ("Increase batch-size (and the learning rate with it), or choose a smaller instance type.")
    cpu_threshold_p95: float = 70.0
    gpu_threshold_p95: float = 70.0
    gpu_memory_threshold_p95: float = 70.0
    patience: int = 1000
    window: int = 500

    def check_samples(self, data):
        data = data[-self.window:]
        cpu = _percentile([s["cpu"] for s in data], 95)
        for gpu in range(len(data[0]["gpu"])):
            util = _percentile([s["gpu"][gpu] for s in data], 95)
            memory = _percentile([s["gpu_memory"][gpu] for s in data], 95)
            evidence = {"gpu": gpu, "cpu_p95": cpu, "gpu_p95": util, "gpu_memory_p95": memory, "samples": len(data)}
            self.note = f"{len(data)} samples: p95 CPU {cpu:.0f}%, GPU {util:.0f}%, GPU memory {memory:.0f}%"
            if (cpu < self.cpu_threshold_p95 and util < self.gpu_threshold_p95
                    and memory < self.gpu_memory_threshold_p95):
                return Finding(f"underused with GPU {gpu}: 95th percentiles CPU {cpu:.0f}%, GPU {util:.0f}%, GPU "
                               f"memory {memory:.0f}% all below their thresholds", evidence=evidence)
        return None


@dataclass(kw_only=True)
class LoadBalancing(GpuSampleRule):
    name = "load_balancing"
    explanation = ("Compares the GPUs' utilisation histograms (10 bins, after skipping `patience` samples) pairwise; "
                   "an issue when two differ by more than threshold (total variation distance, 0: identical, 1: "
                   "disjoint): the work is not spread evenly. Needs two GPUs or more (on the monitored node).")
    advice = ("Use every GPU (processes-per-host = number of GPUs, DDP), give each rank the same share of the "
              "batch, and check that no GPU also runs something else.")
    threshold: float = 0.5
    patience: int = 1000

    def system(self, samples, steps, has_gpu):
        gpus = max((len(s["gpu"]) for s in samples if "gpu" in s), default=0)
        if has_gpu and gpus == 1:
            self.note = "one GPU: nothing to balance"
            return NOT_APPLICABLE
        return super().system(samples, steps, has_gpu)

    def check_samples(self, data):
        count = len(data[0]["gpu"])
        hists = []
        for gpu in range(count):
            bins = [0] * 10
            for s in data:
                bins[min(9, int(s["gpu"][gpu] // 10))] += 1
            hists.append([b / len(data) for b in bins])
        pairs = [(0.5 * sum(abs(x - y) for x, y in zip(hists[i], hists[j])), i, j)
                 for i in range(count) for j in range(i + 1, count)]
        distance, i, j = max(pairs)
        self.note = f"{len(data)} samples of {count} GPUs: largest histogram distance {distance:.2f}"
        if distance <= self.threshold:
            return None
        means = [statistics.fmean(s["gpu"][g] for s in data) for g in (i, j)]
        return Finding(f"GPUs {i} and {j} are loaded unevenly: utilisation histograms differ by {distance:.2f} "
                       f"(threshold {self.threshold:g}; mean utilisation {means[0]:.0f}% vs {means[1]:.0f}%)",
                       evidence={"gpus": [i, j], "distance": distance, "mean_utilisation": means})


@dataclass(kw_only=True)
class StepOutlier(Rule):
    name = "step_outlier"
    profiler = True
    explanation = ("Training step durations: an issue when more than n_outliers steps take longer than the mean "
                   "plus stddev standard deviations (stalls: slow I/O, checkpoints, other processes, recompiles).")
    advice = ("Open the profiler trace around the slow steps (steps.jsonl has their times); look for data loader "
              "stalls, synchronisations, torch.compile recompiles, or checkpoints and evaluation inside the loop.")
    stddev: float = 3.0
    n_outliers: int = 10

    def system(self, samples, steps, has_gpu):
        if len(steps) < 2:
            self.why_not = f"{len(steps)} timed steps (needs 2 or more)"
            return None
        self.evaluated = True
        totals = [s["total"] for s in steps]
        mean, std = statistics.fmean(totals), statistics.pstdev(totals)
        limit = mean + self.stddev * std
        outliers = [s for s in steps if s["total"] > limit]
        self.note = f"{len(steps)} steps: mean {1000 * mean:.1f} ms, {len(outliers)} above {1000 * limit:.1f} ms"
        if len(outliers) <= self.n_outliers:
            return None
        slowest = sorted(outliers, key=lambda s: s["total"], reverse=True)[:5]
        return Finding(f"{len(outliers)} of {len(steps)} steps took longer than {1000 * limit:.1f} ms (mean "
                       f"{1000 * mean:.1f} ms + {self.stddev:g} x {1000 * std:.1f} ms), e.g. step "
                       f"{slowest[0]['step']}: {1000 * slowest[0]['total']:.0f} ms", slowest[0]["step"], None,
                       {"outliers": len(outliers), "mean_s": mean, "std_s": std, "limit_s": limit,
                        "slowest": {s["step"]: s["total"] for s in slowest}})


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


@dataclass(kw_only=True)
class MaxInitializationTime(Rule):
    name = "max_initialization_time"
    profiler = True
    explanation = ("Time from the start of the training process to the start of the first training step (imports, "
                   "data validation, model building, weights, feature extraction); an issue above threshold minutes.")
    advice = ("Check what the log shows between the start and the first step: slow data validation (many small "
              "files: FastFile/FSx or fewer, larger files), weight downloads (bake them into a weights channel), "
              "feature extraction or torch.compile.")
    threshold: float = 20.0  # minutes
    process_start: float = field(default_factory=_process_start, init=False, repr=False, compare=False)

    def system(self, samples, steps, has_gpu):
        started = steps[0]["time"] if steps and "time" in steps[0] else None
        waited = (started if started is not None else time.time()) - self.process_start
        evidence = {"seconds": waited, "threshold_minutes": self.threshold}
        if started is None and waited <= 60 * self.threshold:
            self.why_not = f"no training step yet ({waited:.0f} s since the process started)"
            return None
        self.evaluated = True
        self.note = f"first step after {waited:.1f} s" if started is not None else f"no step after {waited:.0f} s"
        if waited <= 60 * self.threshold:
            return None
        return Finding(f"the first training step {'started' if started else 'had not started'} {waited / 60:.1f} "
                       f"minutes after the process started (threshold {self.threshold:g})", evidence=evidence)


@dataclass(kw_only=True)
class DataloaderWait(Rule):
    name = "dataloader_wait"
    profiler = True
    explanation = ("Share of training step time spent waiting for the next batch (data loading, decoding, "
                   "augmentation, I/O), after skipping the first `patience` steps (workers starting); an issue "
                   "above threshold percent.")
    advice = ("Use more num-workers, keep images small on disk, use the faster file input (FastFile/FSx) or a "
              "local copy of the data, or cache decoded features.")
    threshold: float = 50.0
    patience: int = 10

    def system(self, samples, steps, has_gpu):
        data = [s for s in steps if s["step"] >= self.patience]
        total = sum(s["total"] for s in data)
        if not data or total <= 0:
            self.why_not = f"{len(steps)} timed steps, all within patience={self.patience}"
            return None
        self.evaluated = True
        wait = sum(s["data"] for s in data)
        share = 100 * wait / total
        iowait = [s["iowait"] for s in samples]
        evidence = {"share": share, "steps": len(data), "data_seconds": wait, "step_seconds": total,
                    "mean_cpu_iowait": statistics.fmean(iowait) if iowait else None}
        self.note = f"{len(data)} steps: {share:.1f}% waiting for data"
        if share <= self.threshold:
            return None
        return Finding(f"{share:.0f}% of the time of {len(data)} training steps went to waiting for data "
                       f"(threshold {self.threshold:g}%)", data[-1]["step"], None, evidence)


RULES: dict[str, type[Rule]] = {cls.name: cls for cls in (
    LossNotDecreasing, Overfit, Overtraining, PoorWeightInitialization, VanishingGradient, ExplodingTensor,
    LowGpuUtilization, CpuBottleneck, DataloaderWait, StepOutlier, MaxInitializationTime, IoBottleneck,
    GpuMemoryIncrease, BatchSize, LoadBalancing)}
if tuple(RULES) != config.RULE_NAMES:  # the hyperparameter help and the rule metrics list config's names
    raise ImportError(f"config.RULE_NAMES {config.RULE_NAMES} must list the rules of RULES, in order: {tuple(RULES)}")
# What the profiler report's rule sections show (Debugger's ProfilerReport rules); the others are training rules.
PROFILER_RULES = tuple(name for name, cls in RULES.items() if cls.profiler)


@dataclass
class Result:
    rule: Rule
    status: str = NOT_EVALUATED
    finding: Finding | None = None
    count: int = 0  # findings so far (the first one is kept)

    def to_json(self) -> dict:
        r = self.rule
        return {"name": r.name, "status": self.status, "stop": r.stop, "parameters": r.parameters(),
                "finding": self.finding.__dict__ if self.finding else None, "findings": self.count,
                "reason": r.why_not if self.status == NOT_EVALUATED else r.note if self.status == NOT_APPLICABLE
                else None, "last_check": r.note or None, "explanation": r.explanation,
                "advice": r.advice}


class RuleSet:
    """The chosen rules and their results; feeds them what the loop reports, raises RuleStop for stop rules."""

    def __init__(self, rules: list[Rule]):
        self.results = [Result(r) for r in rules]
        self.stopped_by: str | None = None

    def _dispatch(self, method: str, *args, step: int | None = None, epoch: int | None = None) -> None:
        for result in self.results:
            outcome = getattr(result.rule, method)(*args)
            if result.status == NOT_EVALUATED and result.rule.evaluated:
                result.status = NO_ISSUES
            if outcome is None:
                continue
            if outcome == NOT_APPLICABLE:
                result.status = NOT_APPLICABLE
                continue
            outcome.step = outcome.step if outcome.step is not None else step
            outcome.epoch = outcome.epoch if outcome.epoch is not None else epoch
            result.count += 1
            if result.status == ISSUES:
                continue
            result.status, result.finding = ISSUES, outcome
            where = ", ".join(f"{k} {v}" for k, v in (("step", outcome.step), ("epoch", outcome.epoch))
                              if v is not None)
            log.warning("rule %s: IssuesFound (%s): %s", result.rule.name, where, outcome.message)
            if result.rule.stop:
                self.stopped_by = result.rule.name
                raise RuleStop(f"rule {result.rule.name} stopped the job ({where}): {outcome.message}. "
                               f"{result.rule.advice} (Stopping is on because rules-stop or rules-config lists "
                               f"{result.rule.name}.)")

    def train_loss(self, step: int, epoch: int, loss: float) -> None:
        self._dispatch("train_loss", step, epoch, loss, step=step, epoch=epoch)

    def eval_loss(self, step: int, epoch: int, loss: float) -> None:
        self._dispatch("eval_loss", step, epoch, loss, step=step, epoch=epoch)

    def layer_stats(self, stats: dict) -> None:
        self._dispatch("layer_stats", stats, step=stats["step"], epoch=stats["epoch"])

    def epoch_end(self, history: list[dict]) -> None:
        self._dispatch("epoch_end", history, epoch=history[-1]["epoch"])

    def system(self, samples: list[dict], steps: list[dict], has_gpu: bool, epoch: int | None = None) -> None:
        self._dispatch("system", samples, steps, has_gpu, epoch=epoch)

    def to_json(self) -> list[dict]:
        return [r.to_json() for r in self.results]


def _split(text: str, what: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise HyperparameterError(f"{what}: unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    return names


def _load_config(text: str) -> dict:
    """rules-config: inline JSON object or the path of a JSON file."""
    text = text.strip()
    if not text:
        return {}
    source = "rules-config"
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise HyperparameterError(f"rules-config={text!r}: no such file; give a JSON object such as "
                                      '{"overfit": {"ratio_threshold": 0.5}} or the path of a JSON file')
        source, text = f"rules-config file {path}", path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise HyperparameterError(f"{source} is not valid JSON ({e}); example: "
                                  '{"overfit": {"ratio_threshold": 0.5, "stop": true}}') from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise HyperparameterError(f"{source} must map rule names to objects of parameters, e.g. "
                                  '{"overfit": {"ratio_threshold": 0.5}}')
    return config


def _make(name: str, params: dict) -> Rule:
    cls = RULES[name]
    known = {f.name: f.default for f in fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key not in known:
            raise HyperparameterError(f"rules-config: rule {name} has no parameter {key!r}; its parameters: "
                                      f"{', '.join(known)}")
        want = type(known[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise HyperparameterError(f"rules-config: {name}.{key}={value!r} must be a {want.__name__} "
                                      f"(default {known[key]!r})")
        kwargs[key] = value
    return cls(**kwargs)


def configure(names: str, config_text: str = "", stop: str = "") -> RuleSet:
    """The RuleSet that the hyperparameters rules, rules-config and rules-stop describe."""
    text = names.strip().lower()
    chosen = list(RULES) if text == "all" else [] if text in ("none", "") else _split(text, f"rules={names!r}")
    config = _load_config(config_text)
    unknown = [n for n in config if n not in RULES]
    if unknown:
        raise HyperparameterError(f"rules-config: unknown rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    stops = _split(stop, f"rules-stop={stop!r}")
    off = [n for n in [*config, *stops] if n not in chosen]
    if off:
        raise HyperparameterError(f"rules-config/rules-stop name {', '.join(off)}, which rules={names!r} does not "
                                  "enable; add them to rules or use rules=all")
    rules = [_make(n, config.get(n, {})) for n in chosen]
    for rule in rules:
        rule.stop = rule.stop or rule.name in stops
    return RuleSet(rules)


def markdown_table() -> str:
    rows = ["| rule | parameters (defaults) | what it checks |", "| --- | --- | --- |"]
    for name, cls in RULES.items():
        params = ", ".join(f"`{k}={v!r}`" for k, v in cls().parameters().items())
        rows.append(f"| `{name}` | {params} | {cls.explanation} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
