"""Compose the project's Hydra config (conf/config.yaml) outside a Hydra app: the plan, the rehearsal,
data preparation and the Slurm job build the same config the trainer gets from the same overrides."""

from __future__ import annotations

import os

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def compose(overrides: list[str], run_dir: str | None = None):
    """The composed config for ``overrides`` (Hydra syntax). ``run_dir`` stands in for the Hydra run
    folder the trainer would get (``run_dir`` otherwise interpolates Hydra's runtime, which exists only
    inside an app); an explicit ``run_dir=`` override wins."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    extra = [] if run_dir is None or any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name="config", overrides=[*extra, *overrides])
