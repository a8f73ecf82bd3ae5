"""Run logging on rank 0: ``metrics.jsonl``, Weights & Biases, a one-line progress print per step.

* :class:`MetricsWriter` appends one JSON object per step to ``<run_dir>/metrics.jsonl``. Opened with
  ``resume_step=t`` it first drops the lines with ``step > t`` (written after the checkpoint the run
  resumes from), so the file stays one line per step; ``resume_step=0`` starts it afresh.
* :class:`WandbLogger` wraps ``wandb`` (rank 0 only): ``mode`` online / offline / disabled; online
  without an API key (``WANDB_API_KEY`` or a netrc entry for the W&B host) falls back to offline with
  a logged note; group / name / config come from the run's spec and config; the run id is kept in
  ``<run_dir>/wandb_run_id`` so a resumed run continues the same W&B run.
* :class:`ProgressPrinter` prints ``step 3/20 | loss 4.1234 | kl 0.0123 | null 0.341 | 1.2k tok/s |
  lr 2.00e-05 | eta 0:01:23`` per step on rank 0.
* :func:`save_resolved_config` writes the resolved config beside the run (``config.yaml``).
* :class:`RunLog` is what the trainer holds: the three above, fed one step's metrics at a time.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import sys
import time
from collections.abc import Mapping
from urllib.parse import urlparse

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
JSON_INF = 1e308  # what an infinite metric is written as (JSON has no infinity; NaN becomes null)


def _scalar(x):
    """JSON-able value: tensors / numpy scalars to python numbers (lists for non-scalars)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item") and not isinstance(x, (list, tuple, dict)):
        try:
            return x.item()
        except (ValueError, TypeError):
            pass
    if isinstance(x, Mapping):
        return {str(k): _scalar(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_scalar(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (JSON_INF if x > 0 else -JSON_INF)
    return x


def read_metrics(run_dir: str) -> list[dict]:
    """All records of ``<run_dir>/metrics.jsonl`` (see :func:`read_metrics_file`)."""
    return read_metrics_file(os.path.join(run_dir, METRICS_FILE))


def read_metrics_file(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, one JSON object a line: empty if it cannot be read; a line
    that is not JSON (cut short by a kill, before a resume truncates it) is skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


class MetricsWriter:
    """One JSON object per step in ``<run_dir>/metrics.jsonl`` (rank 0 writes; other ranks no-op)."""

    def __init__(self, run_dir: str, rank0: bool = True, resume_step: int | None = None):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.rank0 = rank0
        self._f = None
        if not rank0:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.isfile(self.path):
            self.truncate(resume_step)
        self._f = open(self.path, "a", buffering=1)

    def truncate(self, resume_step: int) -> int:
        """Drop the lines with ``step > resume_step`` (and unreadable ones); returns lines kept."""
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= resume_step:
                    kept.append(json.dumps(rec) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return len(kept)

    def write(self, step: int, metrics: Mapping) -> None:
        if self._f is None:
            return
        rec = {"step": int(step)}
        rec.update({str(k): _scalar(v) for k, v in metrics.items() if k != "step"})
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def flatten(metrics: Mapping, prefix: str = "", sep: str = "/") -> dict:
    """``{"null_share_per_layer": [a, b]}`` -> ``{"null_share_per_layer/0": a, ...}``; nested dicts too."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        v = _scalar(v)
        if isinstance(v, Mapping):
            out.update(flatten(v, key, sep))
        elif isinstance(v, list):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key, sep))
        else:
            out[key] = v
    return out


def save_resolved_config(cfg, run_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config (interpolations filled in) to ``<run_dir>/<name>``."""
    from omegaconf import OmegaConf

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, name)
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    return path


# ---- Weights & Biases -------------------------------------------------------------------------------
def wandb_api_key_present() -> bool:
    """An API key in WANDB_API_KEY or a netrc entry for the W&B host (the key itself is not read out)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """Rank-0 W&B run; a no-op on other ranks and with ``mode: disabled``."""

    MODES = ("online", "offline", "disabled")

    def __init__(self, spec, rank0: bool = True, run_dir: str | None = None, config: Mapping | None = None):
        """``spec``: the run's :class:`~zeda_megatron.spec.RunSpec` (``logging.wandb``: mode, project,
        entity, group, name, dir, tags; the default group is ``<model.name>-<stage.name>``).
        ``config``: what W&B records as the run's config (the trainer hands the composed config)."""
        wcfg = dict(spec.logging.get("wandb") or {})
        self.run = None
        self.mode = str(wcfg.get("mode", "disabled"))
        if self.mode not in self.MODES:
            raise ValueError(f"logging.wandb.mode={self.mode!r} is unknown; use one of {list(self.MODES)}")
        if not rank0 or self.mode == "disabled":
            return
        if self.mode == "online" and not wandb_api_key_present():
            log.warning("logging.wandb.mode=online but no W&B API key (WANDB_API_KEY or `wandb login`): "
                        "logging offline instead; upload later with `wandb sync`")
            self.mode = "offline"
        run_dir = run_dir or str(spec.run_dir)
        wdir = str(wcfg["dir"]) if wcfg.get("dir") else run_dir
        os.makedirs(wdir, exist_ok=True)
        import wandb

        id_file = os.path.join(run_dir, "wandb_run_id")
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
            os.makedirs(run_dir, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id)
        self.run = wandb.init(
            project=wcfg.get("project"),
            entity=wcfg.get("entity"),
            group=wcfg.get("group") or f"{spec.model.name}-{spec.stage.name}",
            name=wcfg.get("name") or os.path.basename(os.path.normpath(run_dir)),
            tags=list(wcfg.get("tags") or []),
            dir=wdir,
            mode=self.mode,
            id=run_id,
            resume="allow",
            config=dict(config) if config is not None else spec.to_dict(),
            settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, disable_git=True,
                                    save_code=False, silent=True),
        )

    def log(self, metrics: Mapping, step: int) -> None:
        if self.run is not None:
            self.run.log(flatten(metrics), step=int(step))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---- progress line -----------------------------------------------------------------------------------
def _fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def format_progress(step: int, max_steps: int, metrics: Mapping, eta_s: float | None = None) -> str:
    """``step 3/20 | loss 4.1234 | kl 0.0123 | null 0.341 | 1.2k tok/s | lr 2.00e-05 | eta 0:01:23``."""
    parts = [f"step {step}/{max_steps}"]
    m = {k: _scalar(v) for k, v in metrics.items()}
    for key, label in (("loss", "loss"), ("nll", "nll"), ("kl", "kl"), ("group_loss", "group")):
        if isinstance(m.get(key), (int, float)):
            parts.append(f"{label} {m[key]:.4f}")
    if isinstance(m.get("null_share"), (int, float)):
        parts.append(f"null {m['null_share']:.3f}")
    if isinstance(m.get("tokens_per_s"), (int, float)):
        parts.append(f"{_fmt_rate(m['tokens_per_s'])} tok/s")
    if isinstance(m.get("grad_norm"), (int, float)):
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    if isinstance(m.get("lr"), (int, float)):
        parts.append(f"lr {m['lr']:.2e}")
    if eta_s is not None:
        parts.append(f"eta {_fmt_duration(eta_s)}")
    return " | ".join(parts)


class ProgressPrinter:
    """One line per step on rank 0; the ETA is the mean step time since the first logged step."""

    def __init__(self, max_steps: int, rank0: bool = True, enabled: bool = True, stream=None,
                 start_step: int = 0):
        self.max_steps = int(max_steps)
        self.on = rank0 and enabled
        self.stream = stream
        self.t0 = None
        self.step0 = int(start_step)

    def update(self, step: int, metrics: Mapping) -> str | None:
        now = time.monotonic()
        eta = None
        if self.t0 is None:
            self.t0, self.step0 = now, step  # the first step (compile, warm-up) is left out of the rate
        elif step > self.step0:
            eta = (now - self.t0) / (step - self.step0) * (self.max_steps - step)
        if not self.on:
            return None
        line = format_progress(step, self.max_steps, metrics, eta)
        stream = self.stream or sys.stdout
        print(line, file=stream, flush=True)
        return line


class RunLog:
    """The trainer's step log: ``metrics.jsonl``, W&B and the progress line, from the run's spec (rank 0
    writes; other ranks no-op). ``start_step``: the step a resumed run continues from."""

    def __init__(self, spec, run_dir: str, *, rank0: bool, start_step: int = 0, config: Mapping | None = None):
        self.writer = MetricsWriter(run_dir, rank0=rank0, resume_step=start_step)
        self.wandb = WandbLogger(spec, rank0=rank0, run_dir=run_dir, config=config)
        self.progress = ProgressPrinter(spec.trainer.max_steps, rank0=rank0,
                                        enabled=bool(spec.logging.get("progress", True)), start_step=start_step)

    def log(self, step: int, metrics: Mapping) -> None:
        self.writer.write(step, metrics)
        self.wandb.log(metrics, step)
        self.progress.update(step, metrics)

    def close(self) -> None:
        self.writer.close()
        self.wandb.finish()
