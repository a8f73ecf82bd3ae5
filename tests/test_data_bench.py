"""tools/bench_data.py (reduced): packing brings the pad fraction below 5% on its variable-length data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_data_reduced():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_data.py"), "--reduced"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("packed_tokens_per_s", "padded_tokens_per_s", "pad_fraction_packed", "pad_fraction_padded"):
        assert isinstance(res[key], float) and res[key] >= 0, key
    assert res["packed_tokens_per_s"] > 0 and res["padded_tokens_per_s"] > 0
    assert res["pad_fraction_packed"] < 0.05
    assert res["pad_fraction_padded"] > 0.3  # the same samples padded one per row waste most positions
