"""The GPU smoke suite's report: every check's outcome, wall time, budget (its pytest-timeout) and the
figures it recorded through the ``figures`` fixture go to $ZEDA_SMOKE_OUT/report.json at the end of the
session (tools/gpu_smoke.sh sets ZEDA_SMOKE_OUT), with the environment: torch, CUDA, the GPUs and which
megatron-core spec ran (Transformer Engine or the local one)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_CHECKS: dict[str, dict] = {}
_START = time.time()


def environment() -> dict:
    import torch

    from megatron.core.extensions.transformer_engine import HAVE_TE

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    te = None
    if HAVE_TE:
        import transformer_engine

        te = getattr(transformer_engine, "__version__", "unknown")
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus, "transformer_engine": te,
            "spec": "transformer_engine" if (HAVE_TE and gpus) else "local", "python": sys.version.split()[0]}


@pytest.fixture
def figures(request):
    """A dict the check fills with its figures; they land in the report under the check's name."""
    entry = _CHECKS.setdefault(request.node.nodeid, {})
    entry["figures"] = {}
    return entry["figures"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    entry = _CHECKS.setdefault(item.nodeid, {})
    marker = item.get_closest_marker("timeout")
    entry["budget_s"] = marker.args[0] if marker and marker.args else None
    if rep.when == "setup" or rep.when == "call" or rep.failed:
        entry["wall_s"] = round(entry.get("wall_s", 0.0) + rep.duration, 2)
    if rep.when == "setup" and rep.skipped:
        entry["outcome"] = "skipped"
        entry["reason"] = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    elif rep.when == "call":
        entry["outcome"] = rep.outcome
        if rep.skipped:
            entry["reason"] = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if rep.failed:
            entry["error"] = str(rep.longrepr)[-3000:]
    elif rep.failed:
        entry["outcome"] = "error"
        entry["error"] = str(rep.longrepr)[-3000:]


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("ZEDA_SMOKE_OUT")
    if not out or not _CHECKS:
        return
    try:
        env = environment()
    except Exception as e:  # the report still says what ran
        env = {"error": repr(e)}
    report = {"environment": env, "exit_status": int(exitstatus), "wall_s": round(time.time() - _START, 1),
              "passed": sum(c.get("outcome") == "passed" for c in _CHECKS.values()),
              "failed": sum(c.get("outcome") in ("failed", "error") for c in _CHECKS.values()),
              "skipped": sum(c.get("outcome") == "skipped" for c in _CHECKS.values()),
              "checks": _CHECKS}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
