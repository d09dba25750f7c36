"""A tiny Hydra app that is not a Proxy Attention trial, for the launcher's tests (tests/test_any_app.py).

Each job appends one line to ``$COUNTER_DIR/x=<x>`` when it starts, so a test counts how often each job
ran. With ``STOP_AT=<x>`` the job of that ``x`` sends SIGTERM to its launcher and waits to be stopped
(a sweep killed mid-way); ``FAIL_AT=<x>`` makes that job raise.
"""

import os
import signal
import time

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=None, config_name="counter_app_config")
def app(cfg: DictConfig) -> float:
    counter = os.path.join(os.environ["COUNTER_DIR"], f"x={cfg.x}")
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    if os.environ.get("STOP_AT") == str(cfg.x):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)
    if os.environ.get("FAIL_AT") == str(cfg.x):
        raise ValueError(f"x={cfg.x} is refused")
    return cfg.x * cfg.scale


if __name__ == "__main__":
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="counter_app_config", node={"x": 0, "scale": 2.0})
    app()
