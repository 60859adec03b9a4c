"""Tensor collection inside the training loop, in TRAIN and EVAL modes (what SageMaker Debugger's hook saved).

Written as it happens, append-only, under <output>/tensors (a crash loses nothing already written):
- scalars.jsonl: {"mode": "TRAIN"|"EVAL", "step", "epoch", "name": "loss"|"lr", "value"}; the training loss
  every `train_interval` steps, the evaluation loss every `eval_interval` evaluation steps (EVAL steps count
  on across evaluations, like Debugger's mode steps), the learning rate with each training loss;
- layers.jsonl, every `stats_interval` training steps (step 0 included, so the initial weights are seen):
  per parameter the weight norm and the gradient norm and mean |g|, the 5th/95th percentiles of all
  gradients, and per activation-layer call the mean, variance and share of non-positive values of its
  input (the "relu_input" tensors Debugger's poor_weight_initialization rule reads).
The same scalars go to TensorBoard event files (SummaryWriter) under <output>/tensorboard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from imgclf.debugging.profiling import JsonlFile

TRAIN, EVAL = "TRAIN", "EVAL"
# Modules whose input is an "activation input" (models that call F.relu instead get their conv/linear outputs).
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
SAMPLE_PER_TENSOR = 10_000  # gradient elements per tensor that go into the percentile estimate


class Collector:
    def __init__(self, tensors_dir: Path, tensorboard_dir: Path | None, train_interval: int = 10,
                 eval_interval: int = 1, stats_interval: int = 100):
        self.train_interval, self.eval_interval, self.stats_interval = train_interval, eval_interval, stats_interval
        self.scalars = JsonlFile(tensors_dir / "scalars.jsonl")
        self.layers = JsonlFile(tensors_dir / "layers.jsonl")
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir), flush_secs=30)
        self.eval_step = 0
        self.points: dict[str, list[tuple[int, float]]] = {TRAIN: [], EVAL: []}  # collected losses, for the report
        self._hooks: list = []
        self._acts: list[tuple[str, torch.Tensor]] = []

    def scalar(self, mode: str, step: int, epoch: int, name: str, value: float) -> None:
        self.scalars.write({"mode": mode, "step": step, "epoch": epoch, "name": name, "value": value})
        if self.tb is not None:
            self.tb.add_scalar(f"{name}/{mode.lower()}", value, step)

    def train_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if step % self.train_interval == 0:
            self.scalar(TRAIN, step, epoch, "loss", loss)
            self.scalar(TRAIN, step, epoch, "lr", lr)
            self.points[TRAIN].append((step, loss))

    def eval_step_loss(self, epoch: int, loss: float) -> int:
        step, self.eval_step = self.eval_step, self.eval_step + 1
        if step % self.eval_interval == 0:
            self.scalar(EVAL, step, epoch, "loss", loss)
            self.points[EVAL].append((step, loss))
        return step

    def wants_stats(self, step: int) -> bool:
        return step % self.stats_interval == 0

    def hook_activations(self, model: nn.Module) -> None:
        """Watch activation inputs during the next forward pass (removed again by `layer_stats`)."""
        self.remove_hooks()
        if getattr(model, "_compiled_call_impl", None) is not None:
            return  # hooks that come and go would make torch.compile recompile the model
        targets: list[tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
        if not targets:
            targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        calls: dict[str, int] = {}

        def record(name: str, x: torch.Tensor) -> None:
            k = calls[name] = calls.get(name, 0) + 1
            x = x.detach().float()
            var, mean = torch.var_mean(x)
            self._acts.append((name if k == 1 else f"{name}#{k}", torch.stack([mean, var, (x <= 0).float().mean()])))

        for name, module in targets:
            if isinstance(module, ACTIVATIONS):
                hook = module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
            else:
                hook = module.register_forward_hook(lambda m, args, out, name=name: record(name, out))
            self._hooks.append(hook)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def layer_stats(self, model: nn.Module, step: int, epoch: int, source: str = "train_step") -> dict:
        """Weights, gradients and the activations seen since `hook_activations`; written and returned.
        `source` says which forward pass: a training step, or feature extraction (frozen backbone, no gradients)."""
        self.remove_hooks()
        params = [(n, p) for n, p in model.named_parameters()]
        grads = [(n, p.grad) for n, p in params if p.grad is not None]
        weight_norms = torch.stack([p.detach().float().norm() for _, p in params]).tolist() if params else []
        stats: dict = {"step": step, "epoch": epoch, "source": source,
                       "weights": {n: v for (n, _), v in zip(params, weight_norms)}, "gradients": {}}
        if grads:
            g = [t.detach().float() for _, t in grads]
            norms = torch.stack([t.norm() for t in g])
            mean_abs = torch.stack([t.abs().mean() for t in g])
            sample = torch.cat([t.flatten()[:: max(1, t.numel() // SAMPLE_PER_TENSOR)] for t in g])
            p5, p95 = torch.quantile(sample, torch.tensor([0.05, 0.95], device=sample.device)).tolist()
            stats["gradients"] = {n: {"norm": a, "mean_abs": b}
                                  for (n, _), a, b in zip(grads, norms.tolist(), mean_abs.tolist())}
            stats["gradient_percentiles"] = {"p5": p5, "p95": p95}
        if self._acts:
            values = torch.stack([v for _, v in self._acts]).tolist()
            stats["activations"] = {n: {"mean": v[0], "var": v[1], "non_positive": v[2]}
                                    for (n, _), v in zip(self._acts, values)}
            self._acts = []
        self.layers.write(stats)
        if self.tb is not None:
            for name, value in stats["weights"].items():
                self.tb.add_scalar(f"weights/{name}", value, step)
            for name, value in stats["gradients"].items():
                self.tb.add_scalar(f"gradients/{name}", value["norm"], step)
            for name, value in stats.get("activations", {}).items():
                self.tb.add_scalar(f"activations/{name}/var", value["var"], step)
        return stats

    def epoch_end(self, record: dict) -> None:
        """Per-epoch metrics (train/valid loss and accuracy) to TensorBoard, flushed."""
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(f"epoch/{key}", value, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        self.remove_hooks()
        self.scalars.close()
        self.layers.close()
        if self.tb is not None:
            self.tb.close()
