"""Read what a training job recorded, as smdebug's trial API let Debugger users: losses by mode and step, and
the rule results.

    from imgclf.trial import create_trial
    trial = create_trial("s3://bucket/imgclf/output/JOB/output/output.tar.gz")  # or a folder, see below
    trial.tensor("CrossEntropyLoss_output_0").values(mode="EVAL")  # {eval step: loss}; an alias of "loss"
    trial.steps("TRAIN"), trial.tensor_names(), trial.rules(), trial.job_status
    # smdebug's loss-reading code runs with `from imgclf.trial import create_trial, ModeKeys` (docs/debugging.md)

    python -m imgclf.trial PATH_OR_S3 [--plot losses.png]   # rules summary; the loss curves as a PNG

A location is a job's output.tar.gz or model.tar.gz (its output.tar.gz is read, which SageMaker writes beside
it), as a file or an s3:// URI; an S3 prefix holding one job's output.tar.gz (s3://bucket/imgclf/output/JOB);
or a folder: output/data of a job, its output.tar.gz extracted, or a local-mode output folder (reports/).
A prefix or folder without output.tar.gz but with rules.json (the live TensorBoard folder of a running job)
gives the rule results only. S3 is read with boto3's default credentials (AWS_ENDPOINT_URL is honoured).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path

from imgclf import artifacts, atomic, config
from imgclf.errors import UserError

RULES_FILE, SCALARS, LAYERS, METRICS = "rules.json", "scalars.jsonl", "layers.jsonl", "metrics.json"
# smdebug's name of the loss of nn.CrossEntropyLoss, as the reference project's notebook read it
ALIASES = {"CrossEntropyLoss_output_0": "loss"}
KNOWN_FILES = {RULES_FILE, SCALARS, LAYERS, METRICS}  # what is worth fetching from a prefix without output.tar.gz


class TrialError(UserError):
    """A location that is not a training output, or one without debugging data; the message says which."""


class modes:  # noqa: N801  (smdebug's `modes.TRAIN` spelling)
    TRAIN, EVAL = "TRAIN", "EVAL"


ModeKeys = modes  # the name Debugger's notebooks import (smdebug.core.modes.ModeKeys, alias smdebug.modes)


def _mode(mode) -> str:
    name = str(getattr(mode, "name", mode)).upper()
    if name not in (modes.TRAIN, modes.EVAL):
        raise TrialError(f"mode {mode!r}: use TRAIN or EVAL")
    return name


class Tensor:
    def __init__(self, name: str, by_mode: dict[str, dict[int, float]]):
        self.name, self._by_mode = name, by_mode

    def values(self, mode=modes.TRAIN) -> dict[int, float]:
        """{step: value} in `mode` (TRAIN and EVAL steps are counted separately, as smdebug's mode steps)."""
        return dict(self._by_mode.get(_mode(mode), {}))

    def steps(self, mode=modes.TRAIN) -> list[int]:
        return sorted(self.values(mode))

    def value(self, step: int, mode=modes.TRAIN) -> float:
        values = self.values(mode)
        if step not in values:
            raise TrialError(f"tensor {self.name} has no {_mode(mode)} step {step}; steps: {_steps_text(values)}")
        return values[step]


def _steps_text(values: dict) -> str:
    steps = sorted(values)
    return "none" if not steps else ", ".join(map(str, steps)) if len(steps) <= 8 else \
        f"{steps[0]}, {steps[1]}, ... {steps[-1]} ({len(steps)} steps)"


def _jsonl(path: Path) -> list[dict]:
    """Records of an append-only file; a line cut short by a crash is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrialError(f"{path.name} is not valid JSON ({e}): the job's output is damaged") from None


class Trial:
    """The debugging data of one job, read from its data folder (what SageMaker packs into output.tar.gz)."""

    def __init__(self, root: Path, source: str, workdir: tempfile.TemporaryDirectory | None = None):
        self.root, self.source, self._workdir = root, source, workdir  # the workdir lives as long as the trial
        self._tensors: dict[str, dict[str, dict[int, float]]] = {}
        scalars = root / config.DATA_TENSORS / SCALARS
        if scalars.is_file():
            for r in _jsonl(scalars):
                self._add(r["name"], r["mode"], r["step"], r["value"])
        layers = root / config.DATA_TENSORS / LAYERS
        if layers.is_file():
            for r in _jsonl(layers):
                step = r["step"]
                for param, norm in r.get("weights", {}).items():
                    self._add(f"weight_norm/{param}", modes.TRAIN, step, norm)
                for param, g in r.get("gradients", {}).items():
                    self._add(f"gradient_norm/{param}", modes.TRAIN, step, g["norm"])
                    self._add(f"gradient_mean_abs/{param}", modes.TRAIN, step, g["mean_abs"])
                for layer, a in r.get("activations", {}).items():
                    for key in ("mean", "var", "non_positive"):
                        self._add(f"activation_{key}/{layer}", modes.TRAIN, step, a[key])
        self.rules_json: dict = _json_file(root / RULES_FILE)
        self.metrics: dict = _json_file(root / METRICS)

    def _add(self, name: str, mode: str, step: int, value: float) -> None:
        self._tensors.setdefault(name, {}).setdefault(mode, {})[step] = value

    def __repr__(self) -> str:
        return f"Trial({self.source!r}: {len(self._tensors)} tensors, {len(self.rules())} rules)"

    @property
    def job_status(self) -> str | None:
        """Completed, Failed, Stopped, Interrupted, or InProgress (a running job's live rules.json)."""
        return self.rules_json.get("job_status")

    def rules(self) -> list[dict]:
        """Per rule: name, status (NoIssuesFound, IssuesFound, NotApplicable), finding, parameters, advice."""
        return list(self.rules_json.get("rules", []))

    def tensor_names(self, mode=None) -> list[str]:
        if mode is None:
            return sorted(self._tensors)
        return sorted(n for n, by_mode in self._tensors.items() if _mode(mode) in by_mode)

    def has_tensor(self, name: str) -> bool:
        return ALIASES.get(name, name) in self._tensors

    def tensor(self, name: str) -> Tensor:
        canonical = ALIASES.get(name, name)
        if canonical not in self._tensors:
            if not self._tensors:
                raise TrialError(f"{self.source} holds no collected tensors ({config.DATA_TENSORS}/{SCALARS}): a "
                                 "running job's live folder has only its rules; read the job's output.tar.gz when "
                                 "it has ended")
            names = [n for n in self.tensor_names() if "/" not in n] + list(ALIASES)
            raise TrialError(f"no tensor {name!r} in {self.source}; tensors: {', '.join(names)} and per layer "
                             "weight_norm/<param>, gradient_norm/<param>, activation_var/<layer>, ...")
        return Tensor(canonical, self._tensors[canonical])

    def steps(self, mode=modes.TRAIN) -> list[int]:
        """Every step at which something was saved in `mode`."""
        mode = _mode(mode)
        return sorted({s for by_mode in self._tensors.values() for s in by_mode.get(mode, {})})

    def summary(self) -> str:
        lines = [f"{self.source}: job {self.job_status or 'status unknown (no rules.json)'}"
                 + (f", {self.rules_json.get('epochs')} epochs, {self.rules_json.get('steps')} steps"
                    if self.rules_json else "")]
        if self.rules_json.get("error"):
            lines.append(f"  error: {self.rules_json['error']}")
        if "loss" in self._tensors:
            lines.append(f"  loss: {len(self.tensor('loss').values(modes.TRAIN))} TRAIN steps, "
                         f"{len(self.tensor('loss').values(modes.EVAL))} EVAL steps; {len(self._tensors)} tensors")
        rules = self.rules()
        if rules:
            found = [r for r in rules if r["status"] == "IssuesFound"]
            lines.append(f"rules: {len(found)} of {len(rules)} found issues")
            width = max(len(r["name"]) for r in rules)
            for r in rules:
                f = r.get("finding") or {}
                where = ", ".join(f"{k} {f[k]}" for k in ("step", "epoch") if f.get(k) is not None)
                lines.append(f"  {r['name']:<{width}}  {r['status']}"
                             + (f" ({where}): {f.get('message', '')}" if r["status"] == "IssuesFound" else ""))
        else:
            lines.append("rules: none evaluated (rules=none, or no rules.json)")
        return "\n".join(lines)

    def plot_losses(self, path: Path) -> None:
        """The training and evaluation loss curves, as a PNG (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        loss = self.tensor("loss")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, mode, colour in zip(axes, (modes.TRAIN, modes.EVAL), ("tab:blue", "tab:orange")):
            values = loss.values(mode)
            ax.plot(list(values), list(values.values()), marker=".", color=colour)
            ax.set_title(f"{mode} loss" + ("" if values else " (none collected)"))
            ax.set_xlabel(f"{mode} step")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
        fig.suptitle(self.source, fontsize=9)
        fig.tight_layout()
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


# --- where the data is ---------------------------------------------------------------------------------------

WHAT = ("give a training job's output.tar.gz or model.tar.gz (file or s3:// URI), its S3 prefix "
        "(s3://bucket/imgclf/output/JOB), its output/data folder or a local-mode output folder")


def _is_data_root(folder: Path) -> bool:
    return (folder / RULES_FILE).is_file() or (folder / config.DATA_TENSORS / SCALARS).is_file()


def _data_root(folder: Path, source: str) -> Path:
    """The folder holding rules.json or tensors/: `folder` itself or where a job's layout puts it."""
    candidates = [folder, folder / "reports", folder / "output" / "data", folder / "data"]
    for candidate in candidates:
        if _is_data_root(candidate):
            return candidate
    if any((c / METRICS).is_file() for c in candidates):
        raise TrialError(f"{source} is a training output without debugging data (no {RULES_FILE}, no "
                         f"{config.DATA_TENSORS}/{SCALARS}): was the job run with debugging=false?")
    raise TrialError(f"{source} holds no training output ({RULES_FILE}, {config.DATA_TENSORS}/{SCALARS} or "
                     f"output.tar.gz): {WHAT}")


def _extract(tarball: Path, into: Path, source: str) -> Path:
    try:
        with tarfile.open(tarball) as tar:
            artifacts.extract(tar, into)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TrialError(f"{source} is not a readable .tar.gz ({e}): {WHAT}") from None
    return _data_root(into, source)


def _output_tarball_of(name: str) -> str | None:
    """A model.tar.gz names the output.tar.gz SageMaker writes beside it."""
    return name[: -len("model.tar.gz")] + "output.tar.gz" if name.endswith("model.tar.gz") else None


def _open_local(path: Path, work: Path) -> Path:
    if not path.exists():
        raise TrialError(f"{path}: no such file or folder; {WHAT}")
    if path.is_dir():
        for tarball in (path / "output.tar.gz", path / "output" / "output.tar.gz"):
            if tarball.is_file() and not any(_is_data_root(c) for c in (path, path / "reports")):
                return _extract(tarball, work, str(tarball))
        return _data_root(path, str(path))
    if not path.name.endswith((".tar.gz", ".tgz")):
        raise TrialError(f"{path} is neither a folder nor a .tar.gz; {WHAT}")
    output = _output_tarball_of(str(path))
    if output is not None:
        if not Path(output).is_file():
            raise TrialError(f"{path} is a model; its debugging data is in output.tar.gz beside it, and {output} "
                             "does not exist: download the job's output.tar.gz too")
        path = Path(output)
    return _extract(path, work, str(path))


def _s3_client():
    import boto3

    session = boto3.Session(region_name=os.environ.get("AWS_REGION") or None)  # botocore reads AWS_DEFAULT_REGION only
    if session.get_credentials() is None:
        raise TrialError("no AWS credentials to read S3: run `aws configure` or `aws sso login`, or set "
                         "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return session.client("s3", region_name=session.region_name or "us-east-1")


def _s3_call(what: str, fn, **kwargs):
    import botocore.exceptions

    try:
        return fn(**kwargs)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        code = err.get("Code")
        hint = {"NoSuchBucket": "check the bucket name", "NoSuchKey": "check the key",
                "404": "no such object: check the key", "AccessDenied": "your credentials may not read it",
                "403": "your credentials may not read it"}.get(str(code), "")
        raise TrialError(f"{what}: {code}: {err.get('Message') or 'error'}" + (f"; {hint}" if hint else "")
                         + f"; {WHAT}") from None
    except botocore.exceptions.BotoCoreError as e:  # no endpoint, no credentials, ...
        raise TrialError(f"{what}: {e}") from None


def _open_s3(uri: str, work: Path) -> Path:
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri)
    if not m:
        raise TrialError(f"{uri!r} is not an S3 URI: expected s3://<bucket>/<key or prefix>")
    bucket, key = m.group(1), m.group(2) or ""
    s3 = _s3_client()
    if key.endswith((".tar.gz", ".tgz")):
        key = _output_tarball_of(key) or key
        tarball = work / "download" / "output.tar.gz"
        tarball.parent.mkdir(parents=True)
        _s3_call(f"s3://{bucket}/{key}", s3.download_file, Bucket=bucket, Key=key, Filename=str(tarball))
        return _extract(tarball, work / "extracted", f"s3://{bucket}/{key}")
    prefix = key.strip("/") + "/" if key.strip("/") else ""

    def list_keys() -> list[str]:  # the paginator raises (a missing bucket, no access) while iterating
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    keys = _s3_call(f"s3://{bucket}/{prefix}", list_keys)
    outputs = [k for k in keys if k.endswith("/output.tar.gz") or k == "output.tar.gz"]
    if len(outputs) > 1:
        shown = "\n  ".join(f"s3://{bucket}/{k}" for k in outputs[:10])
        raise TrialError(f"s3://{bucket}/{prefix} holds the output of {len(outputs)} jobs; give one:\n  {shown}")
    if outputs:
        return _open_s3(f"s3://{bucket}/{outputs[0]}", work)
    wanted = [k for k in keys if k.rsplit("/", 1)[-1] in KNOWN_FILES]
    if not wanted:
        raise TrialError(f"s3://{bucket}/{prefix} holds no training output (no output.tar.gz, no {RULES_FILE})"
                         + (f" among its {len(keys)} objects" if keys else ": no objects there") + f"; {WHAT}")
    for k in wanted:  # a live TensorBoard folder: rules.json (and whatever else is known)
        target = work / "prefix" / k[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(f"s3://{bucket}/{k}", s3.download_file, Bucket=bucket, Key=k, Filename=str(target))
    folder = work / "prefix"
    roots = sorted({p.parent for p in folder.rglob(RULES_FILE)} | {p.parent.parent for p in folder.rglob(SCALARS)},
                   key=lambda p: len(p.parts))
    return _data_root(roots[0] if roots else folder, f"s3://{bucket}/{prefix}")


def create_trial(location: str | Path) -> Trial:
    """The Trial of a job's output: a local path or an s3:// URI (see the module's docstring)."""
    source = str(location)
    workdir = tempfile.TemporaryDirectory(prefix="imgclf-trial.")
    try:
        work = Path(workdir.name)
        root = _open_s3(source, work) if source.startswith("s3://") else _open_local(Path(source).expanduser(), work)
        trial = Trial(root, source, workdir if root.is_relative_to(work) else None)
    except BaseException:
        workdir.cleanup()
        raise
    if trial._workdir is None:
        workdir.cleanup()
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.trial", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", metavar="PATH_OR_S3", help="output.tar.gz, model.tar.gz, an S3 prefix or a folder")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write the TRAIN and EVAL loss curves to this PNG")
    args = parser.parse_args(argv)
    try:
        trial = create_trial(args.location)
        print(trial.summary())
        if args.plot:
            if args.plot.suffix.lower() != ".png":
                raise TrialError(f"--plot {args.plot}: give a .png file name")
            trial.plot_losses(args.plot)
            print(f"loss curves: {args.plot}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --plot into a folder that cannot be written
        print(f"error: {e.filename or args.plot}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
