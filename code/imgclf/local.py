"""Local mode without Docker: the images' real `train` and `serve` entrypoints as host processes.

    python -m imgclf.local train --data DIR --output DIR [--hyperparameters FILE] [--hp lr=0.001 ...] [--weights FILE]
    python -m imgclf.local serve --model model.tar.gz|DIR [--port 8080] [--workers N] [--ui [--ui-port 8081]]
    python -m imgclf.local serve --models STORE [--port 8080] [--workers N]

`train` checks its arguments (hyperparameters, data layout, weights, OUTPUT) before anything runs, lays out a
temporary /opt/ml tree in OUTPUT (config JSONs, channels linked to DIR's train/valid/test, resourceconfig for
one host), runs the toolkit's `train` command with SAGEMAKER_BASE_DIR pointing at it, then packs /opt/ml/model
as OUTPUT/model.tar.gz like SageMaker does. OUTPUT also receives model/ (the same files, unpacked), reports/
(output/data, what SageMaker packs as output.tar.gz: metrics, rules, the report, collected tensors, ...),
checkpoints/ (running the same command again after an interruption resumes from them) and tensorboard/, the
live folder SageMaker syncs with a TensorBoardOutputConfig: event files, rules.json and the report, current
while the job runs. model.tar.gz, model/ and reports/ are replaced (by renames) only once a run succeeded with a
model: a run that fails, is interrupted or writes no model leaves those of an earlier run as they were, writes
OUTPUT/failure (what to fix, first line) and puts its own reports in failed-reports/ beside an earlier model
(in reports/ when there is none).

`serve` puts the model (a training output folder, or model.tar.gz extracted as SageMaker does) in a temporary
/opt/ml/model and runs the serving image's `serve` entrypoint on it until Ctrl-C. With --ui, a page to try the
model is served beside it (imgclf.ui.server: drop a photo, see the top-5 breeds; the page's requests go through
the same POST /invocations). With --models, a multi-model endpoint instead (SAGEMAKER_MULTI_MODEL=true): STORE
is /opt/ml/models, and SageMaker's calls load its model folders (POST /models {"model_name": "a", "url": "a"}),
invoke them (POST /models/a/invoke) and unload them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imgclf import artifacts, atomic, splits
from imgclf.errors import UserError
from imgclf.processes import MAX_PORT, free_port, run_forwarding_signals, stop_group, venv_bin
from imgclf.serving.settings import ServingSettings, SettingsError
from imgclf.ui import server as ui_server

# What the training images set (containers/train/Dockerfile.*): the public entry point, a shim of
# imgclf.training.job:main.
TRAINING_MODULE = "imgclf.train:main"


def parse_hp(pairs: list[str]) -> dict[str, str]:
    hps = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--hp {pair!r}: write NAME=VALUE, e.g. --hp lr=0.001")
        hps[key.strip()] = value.strip()
    return hps


def hyperparameters_file(path: Path | None) -> dict[str, str]:
    """--hyperparameters FILE, read by the loader scripts/train.py and tune.py use (search.results)."""
    if path is None:
        return {}
    from imgclf.config import hp_string
    from imgclf.search.results import load_hyperparameters

    return {name: hp_string(value) for name, value in load_hyperparameters(path).items()}


def check_hyperparameters(hps: dict[str, str]) -> None:
    """HyperparameterError (a UserError) for what the job would refuse: its own validation, over the values as the
    toolkit decodes hyperparameters.json (each string as JSON if it parses, else as it is)."""
    from imgclf.config import parse_hyperparameters

    def decoded(value: str):
        try:
            return json.loads(value)
        except ValueError:
            return value

    parse_hyperparameters({name: decoded(value) for name, value in hps.items()})


# What `train` writes in OUTPUT: folders, then files. A file where a folder goes (or the reverse) is refused first.
OUTPUT_FOLDERS = ("model", "reports", "failed-reports", "checkpoints", "tensorboard")
OUTPUT_FILES = ("model.tar.gz", "failure")


def output_folder(output: Path, flag: str = "--output") -> None:
    """Create `output`, or a UserError if it cannot hold local mode's results (before anything runs)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"{flag} {output}: is a file; give a folder (it is created if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {output}: cannot create it ({e.strerror or e}); give a folder you can write") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: not writable; give a folder you can write")
    wrong = [f"{name} is a file, not a folder" for name in OUTPUT_FOLDERS
             if (output / name).exists() and not (output / name).is_dir()]
    wrong += [f"{name} is a folder, not a file" for name in OUTPUT_FILES if (output / name).is_dir()]
    if wrong:
        raise UserError(f"{flag} {output}: {'; '.join(wrong)}; move it away or give another {flag}")


def write_tree(base: Path, hps: dict[str, str], channels: dict[str, Path], hosts: list[str] | None = None,
               current_host: str = "algo-1") -> None:
    """The /opt/ml layout SageMaker gives a training container, channels as symlinks (no copy); `hosts` and
    `current_host` simulate one host of a multi-instance job."""
    cfg = base / "input" / "config"
    cfg.mkdir(parents=True)
    # SageMaker passes every hyperparameter value as a string.
    (cfg / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hps.items()}))
    (cfg / "inputdataconfig.json").write_text(json.dumps({
        name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
        for name in channels}))
    (cfg / "resourceconfig.json").write_text(json.dumps({
        "current_host": current_host, "hosts": hosts or [current_host], "current_instance_type": "local",
        "network_interface_name": "lo"}))
    for name, path in channels.items():
        target = base / "input" / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve(), target_is_directory=path.is_dir())
    for d in ("model", "output/data", "output/intermediate"):
        (base / d).mkdir(parents=True, exist_ok=True)


def training_env(base: Path, checkpoints: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the training images give the `train` entrypoint, over the /opt/ml tree at `base`."""
    return {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_TRAINING_MODULE": TRAINING_MODULE,
            "IMGCLF_CHECKPOINT_DIR": str(checkpoints), "PYTHONUNBUFFERED": "1", **(extra or {})}


def readable_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Members any user can read, whoever extracts them (a serving container's non-root user): files 0644,
    folders 0755, whatever the modes and umask of the folder packed."""
    if info.isdir():
        info.mode = 0o755
    elif info.isreg():
        info.mode = 0o644
    return info


def pack_model(model_dir: Path, tarball: Path) -> None:
    """model.tar.gz as SageMaker makes it of /opt/ml/model: the folder's contents at the top level."""
    with atomic.atomic_path(tarball) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name, filter=readable_member)


def train(data_dir: Path, output: Path, hps: dict[str, str], weights: Path | None = None,
          extra_env: dict[str, str] | None = None) -> int:
    """Run the real `train` entrypoint over a temporary /opt/ml tree; return its exit code (not 0 whenever no model
    was written). UserError, with nothing run or written, for bad hyperparameters, data layout, weights or output."""
    check_hyperparameters(hps)
    channels = splits.split_channels(data_dir)  # DataError (a UserError) names what is wrong with the folder
    if weights is not None:
        if not weights.exists():
            raise UserError(f"--weights {weights}: no such file or folder")
        channels["weights"] = weights  # a folder is the channel as it is; a file gets a folder of its own below
    output_folder(output)
    # The tree sits in OUTPUT: its model/ and output/data then move into place by renames.
    with tempfile.TemporaryDirectory(prefix=".opt_ml.", dir=output, ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        write_tree(base, hps, channels)
        if weights is not None and weights.is_file():  # the channel is a folder holding the file
            link = base / "input" / "data" / "weights"
            link.unlink()
            link.mkdir()
            (link / weights.name).symlink_to(weights.resolve())
        env = training_env(base, output / "checkpoints",
                           {"IMGCLF_TENSORBOARD_DIR": str(output / "tensorboard"), **(extra_env or {})})
        code = run_forwarding_signals([venv_bin("train")], env)
        reason = failure_reason(base, code)
        if reason is not None:
            return keep_failure(base, output, code, users_paths(reason, base, channels))
        try:
            publish(base, output)
        except OSError as e:  # a full disk while packing: nothing was replaced yet
            print(f"training succeeded, but its results could not be put in {output} ({e}); free the space (or fix "
                  "the permissions) and train again", file=sys.stderr)
            return 1
    print(f"model: {output / 'model.tar.gz'} (unpacked in {output / 'model'}); reports: {output / 'reports'}")
    return 0


def failure_reason(base: Path, code: int) -> str | None:
    """Why the run in the tree at `base` failed, or None if it succeeded and wrote a model."""
    failure = base / "output" / "failure"
    if failure.exists():
        return failure.read_text(errors="replace").strip() or "an empty failure file"
    if code != 0:
        return "no failure file"
    if not all((base / "model" / name).is_file() for name in (artifacts.CONFIG_FILE, artifacts.WEIGHTS_FILE)):
        return f"the run ended without writing a model ({artifacts.CONFIG_FILE} and {artifacts.WEIGHTS_FILE}): " \
               "was it interrupted? Run the same command again to resume"
    return None


def users_paths(text: str, base: Path, channels: dict[str, Path]) -> str:
    """`text` naming the channels by the user's paths (--data's splits, --weights), not the temporary tree's."""
    for name, path in sorted(channels.items(), key=lambda item: -len(item[0])):  # "training" before "train"
        text = text.replace(str(base / "input" / "data" / name), str(path if path.is_dir() else path.parent))
    return text


def move_into_place(source: Path, target: Path, trash: Path) -> None:
    """Replace the folder `target` with `source` by renames (the old one goes to `trash`, a folder that is removed
    afterwards); without `source`, `target` only goes."""
    if target.exists():
        target.rename(trash / f"old-{target.name}")
    if source.is_dir():
        source.rename(target)


def publish(base: Path, output: Path) -> None:
    """A successful run's model.tar.gz, model/ and reports/ replace the earlier ones, each by a rename."""
    pack_model(base / "model", base / "model.tar.gz")
    move_into_place(base / "model", output / "model", base)
    move_into_place(base / "output" / "data", output / "reports", base)
    os.replace(base / "model.tar.gz", output / "model.tar.gz")
    (output / "failure").unlink(missing_ok=True)
    if (output / "failed-reports").exists():  # an earlier failure's
        (output / "failed-reports").rename(base / "old-failed-reports")


def keep_failure(base: Path, output: Path, code: int, reason: str) -> int:
    """A failed run: its reason in OUTPUT/failure and on stderr, its reports in reports/, or failed-reports/ when
    reports/ belongs to an earlier run's model, which stays as it was. Returns the exit code (never 0)."""
    atomic.write_text(output / "failure", reason + "\n")
    earlier = (output / "model").exists()
    reports = output / ("failed-reports" if earlier else "reports")
    move_into_place(base / "output" / "data", reports, base)
    kept = f"; the earlier model ({output / 'model.tar.gz'}, model/) and its reports/ are kept" if earlier else ""
    print(f"training failed (exit {code}): {reason.splitlines()[0]}\n"
          f"(reason in {output / 'failure'}; this run's reports in {reports}{kept})", file=sys.stderr)
    return code or 1


def serve(model: Path, port: int = 8080, workers: int | None = None, extra_env: dict[str, str] | None = None,
          ui_port: int | None = None, multi_model: bool = False) -> int:
    """Run the real `serve` entrypoint over a temporary /opt/ml tree holding `model` (with `multi_model`, the
    folder of models of a multi-model endpoint); return its exit code. With `ui_port`, the try-a-model page is
    served on it too, for as long as the model server runs."""
    if multi_model and not model.is_dir():
        raise UserError(f"--models {model}: no such folder (give the folder that holds the model folders)")
    if not model.exists():
        raise UserError(f"--model {model}: no such file or folder (give model.tar.gz or a training output folder)")
    if not 0 < port <= MAX_PORT:
        raise UserError(f"--port {port}: multi-model-server takes ports 1-{MAX_PORT}")
    if workers is not None:
        extra_env = {**(extra_env or {}), "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers)}
    try:  # serve's own check, which would otherwise answer 503 until stopped
        ServingSettings.from_environment({**os.environ, **(extra_env or {})})
    except SettingsError as e:
        named = workers is not None and str(e).startswith("SAGEMAKER_MODEL_SERVER_WORKERS=")
        raise UserError(f"--workers: {e}" if named else str(e)) from None
    with socket.socket() as s:  # as serve's front binds it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen there ({e.strerror or e}); pick another --port") from None
    if ui_port is None:
        return _serve(model, port, extra_env, multi_model)
    if not 0 < ui_port <= 65535 or ui_port == port:
        raise UserError(f"--ui-port {ui_port}: give a free port other than --port {port}")
    try:
        page = ui_server.start(ui_port, upstream_port=port)
    except OSError as e:
        raise UserError(f"--ui-port {ui_port}: cannot serve the page there ({e}); pick another port") from None
    print(f"try the model in your browser: {page.url}", file=sys.stderr, flush=True)
    try:
        return _serve(model, port, extra_env)
    finally:
        page.shutdown()
        page.server_close()


def _serve(model: Path, port: int, extra_env: dict[str, str] | None, multi_model: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="opt_ml.") as tmp:
        target = Path(tmp) / ("models" if multi_model else "model")
        if multi_model:  # the store itself: models load from their folders where they are
            target.symlink_to(model.resolve(), target_is_directory=True)
            extra_env = {**(extra_env or {}), "SAGEMAKER_MULTI_MODEL": "true"}
        else:
            target.mkdir()
            if model.is_dir():  # the model folder, or a training --output folder holding it in model/
                inner = (model / "model").is_dir() and not (model / artifacts.CONFIG_FILE).exists()
                for item in (model / "model" if inner else model).iterdir():  # links, not copies: weights are large
                    (target / item.name).symlink_to(item.resolve())
            else:
                try:
                    with tarfile.open(model) as tar:
                        artifacts.extract(tar, target)
                except (tarfile.TarError, OSError) as e:
                    raise UserError(f"--model {model}: not a readable model.tar.gz ({e})") from None
            try:  # serve's own check of config.json, which would otherwise answer 503 until stopped
                artifacts.read_config(target)
            except UserError as e:
                where = str(target / artifacts.CONFIG_FILE)
                raise UserError(f"--model {model}: {str(e).replace(where, 'its ' + artifacts.CONFIG_FILE)}") from None
        env = {**os.environ, "SAGEMAKER_BASE_DIR": tmp, "SAGEMAKER_BIND_TO_PORT": str(port), "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        calls = "POST /models loads a model, POST /models/<name>/invoke" if multi_model else "POST /invocations"
        print(f"serving {model} on http://127.0.0.1:{port} (GET /ping, {calls}); Ctrl-C stops it",
              file=sys.stderr, flush=True)
        return run_forwarding_signals([venv_bin("serve")], env)


STARTUP_TIMEOUT = 240.0  # Java and a Python worker loading the model, on 2 shared cores


class ServerFailed(RuntimeError):
    """A local server that exited or never answered /ping 200; the message ends with its log's tail."""


def wait_healthy(ping: str, timeout: float = STARTUP_TIMEOUT, failed: Callable[[], str | None] = lambda: None,
                 interval: float = 0.5) -> float:
    """Seconds until GET `ping` answered 200: the one wait for a server (local process or container) to be
    healthy. ServerFailed as soon as `failed()` gives a reason (the process or container ended), or at `timeout`."""
    started = time.monotonic()
    while (waited := time.monotonic() - started) < timeout:
        if (reason := failed()) is not None:
            raise ServerFailed(reason)
        try:
            with urllib.request.urlopen(ping, timeout=2) as response:
                if response.status == 200:
                    return waited
        except OSError:  # refused, reset, or an HTTP error status (503 while the model loads)
            pass
        time.sleep(interval)
    raise ServerFailed(f"no healthy {ping} within {timeout:.0f} s")


@dataclass
class LocalServer:
    """A `python -m imgclf.local serve` process group: `url` answers /ping and /invocations, `ui_url` the page."""
    url: str
    proc: subprocess.Popen
    log: Path
    ui_url: str | None = None

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        ping = (self.ui_url or self.url + "/") + "ping"  # with the page, through it: both answer

        def exited() -> str | None:
            return None if self.proc.poll() is None else f"the server exited with {self.proc.returncode}"

        try:
            wait_healthy(ping, timeout, exited)
        except ServerFailed as e:
            raise ServerFailed(f"{e}; its log ({self.log}) ends:\n"
                               + self.log.read_text(errors="replace")[-4000:]) from None

    def stop(self) -> list[str]:
        """SIGTERM the whole group (serve, Java, workers) as Ctrl-C would; what had to be SIGKILLed (none, if
        it stopped cleanly)."""
        return stop_group(self.proc) if self.proc.returncode is None else []


@contextmanager
def server_process(cmd: list[str], url: str, log: Path, env: dict[str, str] | None = None,
                   timeout: float = STARTUP_TIMEOUT, ui_url: str | None = None) -> Iterator[LocalServer]:
    """`cmd` (a server answering `url`/ping) in its own process group, healthy on entry, stopped on exit."""
    code_dir = str(Path(__file__).resolve().parents[1])  # this package, whether installed or run from the repo
    path = os.pathsep.join(p for p in (code_dir, os.environ.get("PYTHONPATH")) if p)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": path, **(env or {})})
    server = LocalServer(url, proc, log, ui_url)
    try:
        server.wait_healthy(timeout)
        yield server
    finally:
        server.stop()


def serving(model: Path, port: int | None = None, workers: int | None = 1, ui: bool = False,
            env: dict[str, str] | None = None, log: Path | None = None,
            timeout: float = STARTUP_TIMEOUT, multi_model: bool = False):
    """`python -m imgclf.local serve` as a context manager yielding a healthy LocalServer: the one recipe the
    demo, the tests, the benchmarks and the screenshot scripts start local servers with. With `multi_model`,
    `model` is the folder of models of a multi-model endpoint (--models)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "imgclf.local", "serve", "--models" if multi_model else "--model", str(model),
           "--port", str(port)]
    cmd += ["--workers", str(workers)] if workers else []
    ui_port = free_port() if ui else None
    cmd += ["--ui", "--ui-port", str(ui_port)] if ui else []
    log = log or Path(tempfile.mkdtemp(prefix="imgclf-serve-")) / "server.log"
    return server_process(cmd, f"http://127.0.0.1:{port}", log, env, timeout,
                          f"http://127.0.0.1:{ui_port}/" if ui else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with the real `train` entrypoint over a temporary /opt/ml tree")
    t.add_argument("--data", type=Path, required=True, help="folder with train/, valid/ (and test/) sub-folders")
    t.add_argument("--output", type=Path, required=True,
                   help="folder for model.tar.gz, model/, reports/ and checkpoints/ (created if missing); a failed "
                        "run keeps an earlier run's model and reports there")
    t.add_argument("--hyperparameters", type=Path, metavar="FILE",
                   help="JSON {name: value}: a recipe (recipes/*.json) or what tune.py wrote; --hp overrides it")
    t.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter (repeat)")
    t.add_argument("--weights", type=Path, metavar="FILE|DIR",
                   help="pretrained backbone weights: a torchvision or timm state_dict file, or a folder of them (the "
                        "file named after the model is used, as from a SageMaker weights channel)")
    srv = sub.add_parser("serve", help="serve a model with the real `serve` entrypoint over a temporary /opt/ml tree")
    what = srv.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="model.tar.gz, a model folder (config.json + weights) or a "
                      "training --output folder (its model/ is served)")
    what.add_argument("--models", type=Path, metavar="STORE", help="a multi-model endpoint: the folder whose model "
                      "folders SageMaker's calls load (POST /models) and invoke (POST /models/<name>/invoke)")
    srv.add_argument("--port", type=int, default=8080, help="port for /ping and /invocations (default 8080)")
    srv.add_argument("--workers", type=int, help="model server workers, 0-1024 (default 0: one per CPU)")
    srv.add_argument("--ui", action="store_true", help="also serve a page to try the model: drop a photo, see the "
                     "top-5 breeds (http://127.0.0.1:UI_PORT/)")
    srv.add_argument("--ui-port", type=int, help="port of the page (default: --port + 1)")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except UserError as e:  # bad arguments or input, as argparse's own errors: exit 2, nothing started
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "train":
        return train(args.data, args.output, {**hyperparameters_file(args.hyperparameters), **parse_hp(args.hp)},
                     args.weights)
    if args.command == "serve":
        if args.ui_port is not None and not args.ui:
            parser.error("--ui-port needs --ui")
        if args.ui and args.models:
            parser.error("--ui tries a single model (--model); a multi-model endpoint has no page")
        return serve(args.model or args.models, args.port, args.workers,
                     ui_port=(args.ui_port or args.port + 1) if args.ui else None, multi_model=args.models is not None)
    return 2


if __name__ == "__main__":
    sys.exit(main())
