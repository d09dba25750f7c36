"""Check model specs before a sweep starts: is ``model.name`` a timm model, and does its CAM target layer
(``model.target_layer``, or the automatic choice) give a real map at ``dataset.image_size``?

The model is built without weights (``pretrained=False``) on PyTorch's ``meta`` device: no download, no
memory, a fraction of a second per model; the target layer is then found exactly as a trial finds it
(:func:`proxyattention.models.find_target_layer`), so a spec that passes here passes in the trial.

For ``model.pretrained=true`` it also says where timm finds the weights (a spec ``{"weights": name}``,
answered by :func:`proxyattention.weights.locate`); whether they are cached is asked at each plan, by the
planner itself, from that answer (:func:`proxyattention.weights.cached_path`, no torch).

The planner stays free of torch: it runs ``python -m proxyattention.modelcheck`` with a JSON list of
specs on stdin and reads a JSON list of answers from stdout, and it remembers answers by the versions
of torch and timm (see :mod:`proxyattention.sweep.plan`).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace
from typing import Any


def check(spec: dict) -> dict:
    """``{"error": None | message, "layer": name, "map": [h, w]}`` for one spec
    ``{"name", "target_layer", "image_size"}``; ``{"error": None, "location": {...}}`` for a spec
    ``{"weights": name}``."""
    if "weights" in spec:
        from proxyattention.weights import locate

        try:
            return {"error": None, "location": locate(spec["weights"])}
        except Exception as e:  # e.g. a pretrained tag timm does not know
            return {"error": f"model.name={spec['weights']!r}: no pretrained weights ({type(e).__name__}: {e})"}
    import torch

    from proxyattention.models import ModelSetupError, build_model, find_target_layer

    cfg = SimpleNamespace(name=spec["name"], pretrained=False, weights=None)
    size = int(spec["image_size"])
    try:
        try:
            with torch.device("meta"):
                model = build_model(cfg, num_classes=2, image_size=size)
            target = find_target_layer(model, size, spec.get("target_layer") or None)
        except ModelSetupError:
            raise
        except Exception:  # a model whose constructor or forward needs real tensors: build it for real
            model = build_model(cfg, num_classes=2, image_size=size)
            target = find_target_layer(model, size, spec.get("target_layer") or None)
    except ModelSetupError as e:
        return {"error": str(e)}
    except Exception as e:  # the trial would fail the same way: say so now
        return {"error": f"model.name={spec['name']!r} cannot be built: {type(e).__name__}: {e}"}
    return {"error": None, "layer": target.name, "map": list(target.map_hw)}


def main() -> None:
    specs: list[dict[str, Any]] = json.load(sys.stdin)
    json.dump([check(s) for s in specs], sys.stdout)


if __name__ == "__main__":
    main()
