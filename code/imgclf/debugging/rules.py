"""Rules that watch a training job while it runs, in the spirit of SageMaker Debugger's built-in rules.

Each rule is a dataclass: its fields are its parameters (defaults close to Debugger's), its methods read
what the training loop reports (every training and evaluation loss, the layer statistics of `collect`,
each epoch's record, the system monitor and step timer of `profiling`) and return a Finding when they see
the problem. A rule's status is NoIssuesFound until its first finding (IssuesFound, kept with the step,
epoch and evidence), or NotApplicable (GPU rules without a GPU).
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from imgclf.errors import HyperparameterError, RuleStop

log = logging.getLogger(__name__)

NO_ISSUES, ISSUES, NOT_APPLICABLE = "NoIssuesFound", "IssuesFound", "NotApplicable"


@dataclass
class Finding:
    message: str
    step: int | None = None
    epoch: int | None = None
    evidence: dict = field(default_factory=dict)


def _bad(x: float, only_nan: bool = False) -> bool:
    return math.isnan(x) or (not only_nan and math.isinf(x))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass(kw_only=True)
class Rule:
    name: ClassVar[str]
    explanation: ClassVar[str]
    advice: ClassVar[str]
    stop: bool = False  # end the job (RuleStop) when the rule finds an issue

    note: str = field(default="", init=False, repr=False, compare=False)  # what the last check looked at

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
    explanation = ("Compares the mean training loss of each window of num_steps steps with the window before; "
                   "an issue when it has not fallen by at least diff_percent (or is NaN/Inf).")
    advice = ("Lower the learning rate if the loss is rising or erratic; if it has plateaued, the model may have "
              "converged (stop earlier) or need a learning-rate schedule, more capacity or unfrozen layers.")
    num_steps: int = 10
    diff_percent: float = 0.0

    def __post_init__(self):
        self._window: list[float] = []
        self._previous: float | None = None

    def train_loss(self, step, epoch, loss):
        self._window.append(loss)
        if len(self._window) < self.num_steps:
            return None
        mean, self._window = statistics.fmean(self._window), []
        previous, self._previous = self._previous, mean
        self.note = f"window ending at step {step}: mean loss {mean:.4g}"
        if math.isfinite(mean) and (previous is None or mean < previous * (1 - self.diff_percent / 100)):
            return None
        return Finding(
            f"mean training loss over steps {step - self.num_steps + 1}-{step} is {mean:.4g}, not "
            + (f"{self.diff_percent:g}% " if self.diff_percent else "")
            + (f"below {previous:.4g} of the {self.num_steps} steps before" if previous is not None else "finite"),
            step, epoch, {"window_mean": mean, "previous_window_mean": previous, "num_steps": self.num_steps})


@dataclass(kw_only=True)
class Overfit(Rule):
    name = "overfit"
    explanation = ("Compares each epoch's validation loss with its training loss; an issue when "
                   "(valid_loss - train_loss) / train_loss exceeds ratio_threshold while the validation loss is "
                   "above its best, for patience epochs in a row. (Debugger's rule looks at the ratio alone, "
                   "which flags nearly every run on a small dataset.)")
    advice = ("Add data or augmentation (augment=true), regularise (weight-decay, label-smoothing), freeze more "
              "layers or train fewer epochs (early-stopping-patience).")
    start_epoch: int = 1
    patience: int = 2
    ratio_threshold: float = 0.1

    def __post_init__(self):
        self._count = 0
        self._best = math.inf

    def epoch_end(self, history):
        r = history[-1]
        best, self._best = self._best, min(self._best, r["valid_loss"])
        if r["epoch"] < self.start_epoch:
            return None
        ratio = (r["valid_loss"] - r["train_loss"]) / max(r["train_loss"], 1e-12)
        gap = ratio > self.ratio_threshold and not r["valid_loss"] <= best  # NaN counts as worse
        self._count = self._count + 1 if gap else 0
        self.note = f"epoch {r['epoch']}: ratio {ratio:.3g}, best valid loss {self._best:.4g}"
        if self._count < self.patience:
            return None
        return Finding(
            f"validation loss {r['valid_loss']:.4g} is {100 * ratio:.0f}% above training loss {r['train_loss']:.4g} "
            f"(threshold {100 * self.ratio_threshold:.0f}%) and above its best {best:.4g}, {self._count} epochs in "
            "a row", None, r["epoch"],
            {"train_loss": r["train_loss"], "valid_loss": r["valid_loss"], "ratio": ratio, "best_valid_loss": best})


@dataclass(kw_only=True)
class Overtraining(Rule):
    name = "overtraining"
    explanation = ("Watches the best training and validation loss per epoch; an issue when the training loss has "
                   "not improved by delta for patience_train epochs, or the validation loss for patience_validation.")
    advice = ("Training longer no longer helps: stop earlier (early-stopping-patience, fewer epochs) or change "
              "the learning rate schedule; the best epoch's model is the one saved.")
    patience_train: int = 5
    patience_validation: int = 5
    delta: float = 0.01

    def __post_init__(self):
        self._best = {"train_loss": (math.inf, 0), "valid_loss": (math.inf, 0)}

    def epoch_end(self, history):
        r = history[-1]
        stale = {}
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

    def layer_stats(self, stats):
        if self._checked or stats["step"] >= self.steps:
            return None
        self._checked = True
        variances = {n: a["var"] for n, a in stats.get("activations", {}).items()}
        if variances:
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
    explanation = "An issue when the mean absolute gradient of any trained parameter tensor falls below threshold."
    advice = ("Check the initialisation (poor_weight_initialization), use normalisation layers or residual "
              "connections, a higher learning rate for the layers concerned, or a ReLU-family activation.")
    threshold: float = 1e-7

    def layer_stats(self, stats):
        tiny = {n: g["mean_abs"] for n, g in stats["gradients"].items() if g["mean_abs"] < self.threshold}
        self.note = f"step {stats['step']}: {len(stats['gradients'])} gradient tensors checked"
        if not tiny:
            return None
        shown = dict(sorted(tiny.items(), key=lambda kv: kv[1])[:5])
        return Finding(f"{len(tiny)} of {len(stats['gradients'])} gradient tensors have mean |g| below "
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
        self.note = f"{mode} loss at step {step}"
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
    of each subclass) are skipped; `check_samples` judges the rest."""

    def system(self, samples, steps, has_gpu):
        if not has_gpu:
            self.note = "no GPU found by NVML"
            return NOT_APPLICABLE
        data = [s for s in samples if "gpu" in s][self.patience:]
        self.note = f"{len(data)} samples analysed"
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
                   "utilisation while the CPU is above cpu_threshold: the CPU (data loading, augmentation) starves "
                   "the GPU; an issue above threshold percent.")
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
                      and s["cpu"] > self.cpu_threshold)
        share = 100 * starved / len(data)
        if share <= self.threshold:
            return None
        return Finding(f"in {share:.0f}% of {len(data)} samples the CPU was above {self.cpu_threshold:g}% while "
                       f"the GPU was below {self.gpu_threshold:g}%", evidence={"share": share, "samples": len(data)})


@dataclass(kw_only=True)
class DataloaderWait(Rule):
    name = "dataloader_wait"
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
            self.note = "no steps analysed yet"
            return None
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
    LowGpuUtilization, CpuBottleneck, DataloaderWait)}


@dataclass
class Result:
    rule: Rule
    status: str = NO_ISSUES
    finding: Finding | None = None
    count: int = 0  # findings so far (the first one is kept)

    def to_json(self) -> dict:
        r = self.rule
        return {"name": r.name, "status": self.status, "stop": r.stop, "parameters": r.parameters(),
                "finding": self.finding.__dict__ if self.finding else None, "findings": self.count,
                "last_check": r.note or "not evaluated yet (not enough data)", "explanation": r.explanation,
                "advice": r.advice}


class RuleSet:
    """The chosen rules and their results; feeds them what the loop reports, raises RuleStop for stop rules."""

    def __init__(self, rules: list[Rule]):
        self.results = [Result(r) for r in rules]
        self.stopped_by: str | None = None

    def _dispatch(self, method: str, *args, step: int | None = None, epoch: int | None = None) -> None:
        for result in self.results:
            outcome = getattr(result.rule, method)(*args)
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
    kwargs = {}
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
