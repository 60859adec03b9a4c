"""The profiler report: one self-contained HTML file (plots embedded as PNG data URIs, no script, no network).

Sections (element ids): summary, training (loss and accuracy curves), classes (confusion matrix, worst classes,
most-confused pairs), system (utilisation over time),
steps (step time breakdown), rules (results, explanations, advice), operators (torch.profiler top operators).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Collection
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from imgclf.debugging.classes import ClassResults  # noqa: E402
from imgclf.debugging.profiling import PHASES  # noqa: E402

SECTIONS = {"summary": "Summary", "training": "Training curves", "classes": "Classes", "system": "System utilisation",
            "usage": "System usage statistics", "steps": "Step time breakdown", "rules": "Rules",
            "profiler": "Profiler rules", "operators": "Top operators (torch.profiler)"}
# The usage table's rows: label and monitor-sample key; list-valued keys give a row per GPU.
USAGE_METRICS = (("CPU total (%)", "cpu"), ("CPU busiest core (%)", "cpu_busiest"), ("CPU I/O wait (%)", "iowait"),
                 ("memory (%)", "memory"), ("disk read (MB/s)", "disk_read_mb_s"),
                 ("disk write (MB/s)", "disk_write_mb_s"), ("network in (MB/s)", "net_recv_mb_s"),
                 ("network out (MB/s)", "net_sent_mb_s"), ("GPU {} (%)", "gpu"), ("GPU {} memory (%)", "gpu_memory"))
TOP_OPERATORS = 15  # rows in the report; top_operators.json beside the trace has more
STATUS_CLASS = {"IssuesFound": "bad", "NoIssuesFound": "good", "NotApplicable": "na", "NotEvaluated": "warn",
                "InProgress": "na"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#17752f;font-weight:600}.warn{color:#8a5a00;font-weight:600}.bad{color:#b00020;font-weight:600}.na{color:#777}
img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6;padding:0 .2em}.muted{color:#666}
nav a{margin-right:1em}.banner{padding:.6em 1em;border-radius:4px;margin:.5em 0}
td p{margin:.2em 0}.banner.bad{background:#fde8ea}.banner.good{background:#e6f4ea}
"""


@dataclass
class ReportData:
    job: dict
    hyperparameters: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    loss_points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    step_totals: dict[str, float] = field(default_factory=dict)
    rules: list[dict] = field(default_factory=list)
    top_operators: list[dict] = field(default_factory=list)
    profiler_steps: list[int] = field(default_factory=list)
    trace: str | None = None
    classes: ClassResults | None = None  # the selected model on the report split; None until the job's end


def _e(value) -> str:
    return html.escape(str(value))


def _finite(values) -> list[float]:
    return [v if isinstance(v, int | float) and math.isfinite(v) else math.nan for v in values]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _scale(ax, values: list[float]) -> None:
    """Log scale when a (diverging) loss spans orders of magnitude."""
    pos = [v for v in values if v == v and v > 0]
    if pos and max(pos) / min(pos) > 1e3:
        ax.set_yscale("log")


def _table(rows: list[list], header: list[str], numeric: Collection[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _training(d: ReportData) -> str:
    if not d.history and not any(d.loss_points.values()):
        return '<p class="muted">No training data: the job ended before its first step.</p>'
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    epochs = [r["epoch"] for r in d.history]
    for key, label in (("train_loss", "train"), ("valid_loss", "valid")):
        axes[0][0].plot(epochs, _finite(r[key] for r in d.history), marker="o", label=label)
    _scale(axes[0][0], _finite(r[k] for r in d.history for k in ("train_loss", "valid_loss")))
    for key, label in (("train_accuracy", "train"), ("valid_accuracy", "valid")):
        axes[0][1].plot(epochs, _finite(r[key] for r in d.history), marker="o", label=label)
    axes[0][0].set(title="loss per epoch", xlabel="epoch")
    axes[0][1].set(title="accuracy per epoch", xlabel="epoch", ylim=(0, 1.02))
    for ax, mode, title in ((axes[1][0], "TRAIN", "training loss (collected steps)"),
                            (axes[1][1], "EVAL", "evaluation loss (collected steps)")):
        points = d.loss_points.get(mode, [])
        values = _finite(v for _, v in points)
        ax.plot([s for s, _ in points], values, color="tab:blue" if mode == "TRAIN" else "tab:orange", lw=1)
        _scale(ax, values)
        ax.set(title=title, xlabel=f"{mode} step")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=.3)
    for ax in axes[1]:
        ax.grid(alpha=.3)
    fig.tight_layout()
    rows = [[r["epoch"], *(f"{r[k]:.4f}" for k in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")),
             f"{r.get('lr', math.nan):.3g}", r.get("seconds", "")] for r in d.history]
    return _png(fig) + _table(rows, ["epoch", "train loss", "train acc", "valid loss", "valid acc", "lr", "seconds"],
                              set(range(7)))


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _classes(d: ReportData) -> str:
    c = d.classes
    if c is None:
        return '<p class="muted">Written when the job has evaluated its selected model.</p>'
    worst = _table([[_e(w["class"]), f"{w['accuracy']:.3f}", w["images"]] for w in c.worst],
                   ["class", "accuracy", "images"], {1, 2})
    pairs = _table([[_e(p["true"]), _e(p["predicted"]), p["count"], f"{p['share']:.3f}",
                     "<br>".join(f"<code>{_e(x)}</code>" for x in p["examples"])] for p in c.most_confused],
                   ["true class", "predicted as", "images", "share of the class", "examples"], {2, 3})
    return (f'<p>The selected model on the {_e(c.split)} split ({len(c.names)} classes). The same plots are '
            f'<code>confusion_matrix_{_e(c.split)}.png</code> and <code>worst_classes_{_e(c.split)}.png</code> '
            f'beside this report; the counts are in <code>confusion_matrix_{_e(c.split)}.csv</code>.</p>'
            + _image(c.plots["confusion_matrix"], "confusion matrix")
            + f'<h3>The {len(c.worst)} worst classes</h3>'
            + _image(c.plots["worst_classes"], "worst classes") + worst
            + f"<h3>The {len(c.most_confused)} most-confused pairs</h3>"
            + (pairs if c.most_confused else '<p class="good">No image was confused.</p>'))


def _system(d: ReportData) -> str:
    if not d.samples:
        return '<p class="muted">No monitor samples (the job was shorter than one monitor interval).</p>'
    t = [s["t"] for s in d.samples]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
    ax1.plot(t, [s["cpu"] for s in d.samples], label="CPU")
    ax1.plot(t, [s["memory"] for s in d.samples], label="memory")
    ax1.plot(t, [s["iowait"] for s in d.samples], label="I/O wait", lw=.8)
    for i in range(len(d.samples[-1].get("gpu", []))):
        ax1.plot(t, [s["gpu"][i] if "gpu" in s else math.nan for s in d.samples], label=f"GPU {i}")
        ax1.plot(t, [s["gpu_memory"][i] if "gpu" in s else math.nan for s in d.samples], ls="--",
                 label=f"GPU {i} memory")
    ax1.set(title="utilisation (%)", xlabel="seconds", ylim=(0, 102))
    for key, label in (("disk_read_mb_s", "disk read"), ("disk_write_mb_s", "disk write"),
                       ("net_recv_mb_s", "network in"), ("net_sent_mb_s", "network out")):
        ax2.plot(t, [s[key] for s in d.samples], label=label)
    ax2.set(title="I/O (MB/s)", xlabel="seconds")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=.3)
    fig.tight_layout()
    gpu = "" if "gpu" in d.samples[-1] else '<p class="muted">No GPU found by NVML: GPU series omitted.</p>'
    return _png(fig) + gpu + f'<p class="muted">{len(d.samples)} samples over {t[-1]:.0f} s.</p>'


def _steps(d: ReportData) -> str:
    if not d.steps:
        return '<p class="muted">No training step was timed.</p>'
    bins = max(1, math.ceil(len(d.steps) / 100))  # at most 100 bars: mean of each bin of steps
    groups = [d.steps[i:i + bins] for i in range(0, len(d.steps), bins)]
    x = [g[0]["step"] for g in groups]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    bottom = [0.0] * len(groups)
    for phase in PHASES:
        ms = [1000 * sum(s[phase] for s in g) / len(g) for g in groups]
        ax1.bar(x, ms, bottom=bottom, width=max(1, bins) * .9, align="edge", label=phase)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax1.set(title="time per training step (ms)" + (f", mean of {bins} steps" if bins > 1 else ""), xlabel="step")
    ax1.legend(fontsize=8)
    totals = d.step_totals or {p: sum(s[p] for s in d.steps) for p in (*PHASES, "total")}
    ax2.barh(list(PHASES)[::-1], [totals[p] for p in PHASES][::-1], color=["C3", "C2", "C1", "C0"])
    ax2.set(title="total seconds per phase")
    fig.tight_layout()
    total = totals.get("total") or 1.0
    count = len(d.steps)
    rows = [[p, f"{totals[p]:.2f}", f"{100 * totals[p] / total:.1f}%", f"{1000 * totals[p] / count:.1f}"]
            for p in PHASES]
    other = total - sum(totals[p] for p in PHASES)
    rows.append(["other (bookkeeping)", f"{other:.2f}", f"{100 * other / total:.1f}%", f"{1000 * other / count:.1f}"])
    return _png(fig) + _table(rows, ["phase", "seconds", "share", "ms per step"], {1, 2, 3})


def _rules(d: ReportData) -> str:
    if not d.rules:
        return '<p class="muted">No rules were enabled (hyperparameter rules=none).</p>'
    rows = []
    for r in d.rules:
        f = r.get("finding") or {}
        where = ", ".join(f"{k} {f[k]}" for k in ("step", "epoch") if f.get(k) is not None)
        detail = f"<p>{_e(r['explanation'])}</p>"
        if f:
            detail = f"<p><b>{_e(f['message'])}</b></p>" + detail + f"<p><i>Advice:</i> {_e(r['advice'])}</p>"
        if r.get("reason"):
            detail += f'<p class="{STATUS_CLASS.get(r["status"], "na")}">{_e(r["status"])}: {_e(r["reason"])}</p>'
        if r.get("last_check"):
            detail += f'<p class="muted">last check: {_e(r["last_check"])}</p>'
        params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items())
        rows.append([f"<code>{_e(r['name'])}</code>" + (" (stop)" if r.get("stop") else ""),
                     f'<span class="{STATUS_CLASS.get(r["status"], "na")}">{_e(r["status"])}</span>',
                     _e(where), detail, f"<code>{_e(params)}</code>"])
    found = sum(r["status"] == "IssuesFound" for r in d.rules)
    unjudged = sum(r["status"] == "NotEvaluated" for r in d.rules)
    head = (f'<div class="banner {"bad" if found else "good"}">{found} of {len(d.rules)} rules found issues'
            + (f"; {unjudged} could not judge (NotEvaluated: see why below)" if unjudged else "") + ".</div>")
    return head + _table(rows, ["rule", "status", "where", "finding, explanation, advice", "parameters"])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _usage(d: ReportData) -> str:
    """p50/p95/p99 and max of every monitored quantity on this node (Debugger's OverallSystemUsage table)."""
    if not d.samples:
        return '<p class="muted">No monitor samples (the job was shorter than one monitor interval).</p>'
    rows = []
    for label, key in USAGE_METRICS:
        values = [max(s.get("cpu_cores") or [s["cpu"]]) if key == "cpu_busiest" else s.get(key) for s in d.samples]
        series = ([[v[i] for v in values if v is not None and i < len(v)] for i in range(len(values[-1] or []))]
                  if "{}" in label else [values])
        for i, vs in enumerate(series):
            if vs:
                rows.append([_e(d.job.get("host", "")), _e(label.format(i)),
                             *(f"{_quantile(vs, q):.1f}" for q in (50, 95, 99)), f"{max(vs):.1f}"])
    return (_table(rows, ["node", "metric", "p50", "p95", "p99", "max"], {2, 3, 4, 5})
            + f'<p class="muted">{len(d.samples)} monitor samples of the node that runs rank 0.</p>')


def _profiler_facts(name: str, d: ReportData) -> list[list]:
    """What a profiler rule's section shows besides its status: the numbers it judged."""
    totals = [s["total"] for s in d.steps]
    if name == "step_outlier" and len(totals) > 1:
        mean, std = sum(totals) / len(totals), (sum((t - sum(totals) / len(totals)) ** 2 for t in totals)
                                                  / len(totals)) ** .5
        return [["steps", len(totals)], ["mean (ms)", f"{1000 * mean:.1f}"], ["std (ms)", f"{1000 * std:.1f}"],
                *([f"p{q} (ms)", f"{1000 * _quantile(totals, q):.1f}"] for q in (50, 95, 99)),
                ["max (ms)", f"{1000 * max(totals):.1f}"]]
    if name == "max_initialization_time" and d.steps and "time" in d.steps[0] and d.job.get("process_start"):
        return [["process start to first step (s)", f"{d.steps[0]['time'] - d.job['process_start']:.1f}"]]
    if name == "dataloader_wait" and totals:
        return [["share of step time waiting for data", f"{100 * sum(s['data'] for s in d.steps) / sum(totals):.1f}%"]]
    return []


def _profiler(d: ReportData) -> str:
    """One block per ProfilerReport rule: status, finding or reason, the numbers it judged, advice."""
    from imgclf.debugging.rules import PROFILER_RULES

    shown = [r for r in d.rules if r["name"] in PROFILER_RULES]
    if not shown:
        return '<p class="muted">No profiler rule was enabled (hyperparameter rules).</p>'
    parts = []
    for r in shown:
        f = r.get("finding") or {}
        status = f'<span class="{STATUS_CLASS.get(r["status"], "na")}">{_e(r["status"])}</span>'
        rows = [["status", status]]
        if f:
            rows += [["finding", f"<b>{_e(f['message'])}</b>"], ["advice", _e(r["advice"])]]
        if r.get("reason"):
            rows.append(["why", _e(r["reason"])])
        if r.get("last_check"):
            rows.append(["last check", _e(r["last_check"])])
        rows += [[_e(k), _e(v)] for k, v in _profiler_facts(r["name"], d)]
        rows.append(["parameters", f"<code>{_e(', '.join(f'{k}={v}' for k, v in r['parameters'].items()))}</code>"])
        parts.append(f'<div class="profiler-rule" id="rule-{_e(r["name"])}"><h3><code>{_e(r["name"])}</code></h3>'
                     f"<p>{_e(r['explanation'])}</p>{_table(rows, ['', ''])}</div>")
    return "".join(parts)


def _operators(d: ReportData) -> str:
    if not d.top_operators:
        return ('<p class="muted">No profiler capture (profiler-steps=0, or the job ended before '
                'profiler-start-step).</p>')
    rows = [[_e(o["name"]), o["calls"], f"{o['self_cpu_ms']:.2f}", f"{o['cpu_total_ms']:.2f}",
             f"{o['self_device_ms']:.2f}"] for o in d.top_operators[:TOP_OPERATORS]]
    note = (f"<p>Steps {_e(d.profiler_steps[0])}-{_e(d.profiler_steps[-1])} captured. Full trace: "
            f"<code>{_e(d.trace)}</code> (in the job's output; open it in ui.perfetto.dev, chrome://tracing or "
            "TensorBoard's profile plugin).</p>") if d.profiler_steps else ""
    return note + _table(rows, ["operator", "calls", "self CPU ms", "CPU total ms", "self device ms"], {1, 2, 3, 4})


def _summary(d: ReportData) -> str:
    j = d.job
    ok = j.get("status") == "Completed"
    tone = "good" if ok else "na" if j.get("status") == "InProgress" else "bad"  # the live report: InProgress
    banner = (f'<div class="banner {tone}">Job {_e(j.get("status"))}'
              + (f": {_e(j['error'])}" if j.get("error") else "") + "</div>")
    facts = [[k, _e(j[k])] for k in ("model", "device", "gpu", "epochs", "steps", "started", "duration_s", "host",
                                     "torch") if k in j]
    hps = _table([[f"<code>{_e(k)}</code>", _e(v)] for k, v in sorted(d.hyperparameters.items())],
                 ["hyperparameter", "value"])
    return banner + _table(facts, ["job", ""]) + f"<details><summary>hyperparameters</summary>{hps}</details>"


def render(d: ReportData) -> str:
    parts = {"summary": _summary, "training": _training, "classes": _classes, "system": _system, "usage": _usage,
             "steps": _steps, "rules": _rules, "profiler": _profiler, "operators": _operators}
    body = "".join(f'<section id="{key}"><h2>{_e(SECTIONS[key])}</h2>{fn(d)}</section>' for key, fn in parts.items())
    nav = "".join(f'<a href="#{k}">{_e(v)}</a>' for k, v in SECTIONS.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Profiler report: '
            f'{_e(d.job.get("model", ""))}</title><style>{CSS}</style></head><body><h1>Profiler report</h1>'
            f"<nav>{nav}</nav>{body}</body></html>\n")
