"""``train.batch_size=auto`` on the CPU, the GPU simulated: what counts as out of memory, what a tried
size runs, the headroom rule, and that the choice survives a resume."""

import pytest
import torch
from omegaconf import OmegaConf

from proxyattention import proxy as proxy_mod
from proxyattention import train as train_mod
from proxyattention.config import TrialConfig
from proxyattention.device import Precision
from proxyattention.proxy import ProxyState
from proxyattention.train import MemoryGauge, TrialError, find_batch_size, is_oom, search_batch_size

CUDA_ALLOCATION_FAILURES = [
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_INITIALIZED",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
]


@pytest.mark.parametrize("message", CUDA_ALLOCATION_FAILURES)
def test_every_cuda_allocation_failure_is_out_of_memory(message):
    assert is_oom(RuntimeError(message))


def test_other_errors_are_not_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"))
    assert not is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))
    assert not is_oom(ValueError("out of memory"))  # not what CUDA raises


def failing_above(k: int, message: str = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"):
    tried = []

    def step(bs: int) -> None:
        tried.append(bs)
        if bs > k:
            raise RuntimeError(message)

    return step, tried


@pytest.mark.parametrize("message", CUDA_ALLOCATION_FAILURES)
def test_the_search_stops_at_a_cudnn_or_cublas_allocation_failure(message):
    step, tried = failing_above(20, message)
    assert search_batch_size(step, 10_000, MemoryGauge()) == 16
    assert tried == [2, 4, 8, 16, 32]


def test_headroom_keeps_the_largest_size_within_90_percent_of_memory_else_one_size_less():
    def run(per_image: int, limit: int = 10_000) -> tuple[int, int]:
        peak, resets = [0], []

        def step(bs: int) -> None:
            if bs > 20:
                raise torch.OutOfMemoryError("CUDA out of memory")
            peak[0] = per_image * bs

        gauge = MemoryGauge(capacity=1000, peak=lambda: peak[0], reset=lambda: resets.append(1))
        return search_batch_size(step, limit, gauge), len(resets)

    assert run(56) == (16, 6)  # 16 images: 896 of 1000 bytes, within 90%; memory released 5 + 1 times
    assert run(57)[0] == 8  # 16 images: 912 bytes, over 90%: one power of two less
    assert run(1, limit=12)[0] == 8  # never above the limit (the size of the training set)


def test_an_error_that_is_not_an_allocation_failure_propagates():
    def step(bs: int) -> None:
        if bs == 8:
            raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        search_batch_size(step, 10_000, MemoryGauge())


def test_the_cuda_gauge_reads_free_plus_held_memory_and_the_reserved_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 15 * 2**29)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset_peak"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    gauge = train_mod.cuda_gauge(torch.device("cuda"))
    assert gauge.capacity == 8 * 2**30
    step, _ = failing_above(40)
    # 32 fit, but its 7.5 GiB peak is over 90% of the 8 GiB the trial may use: 16.
    assert search_batch_size(step, 10_000, gauge) == 16
    assert calls[:3] == ["empty_cache", "reset_peak", "sync"]


# ---------------------------------------------------------------------------------------- the probe


def _cfg(**train):
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.image_size = 16
    cfg.method.batch_size = 4
    cfg.train.eval_batch_size = 8
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


@pytest.fixture
def tiny():
    from proxyattention.models import build_model, find_target_layer

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, 16)
    return cfg, model, find_target_layer(model, 16, None)


def _fail_forward_above(model, k: int):
    """The model's forward raises cuDNN's allocation failure for batches larger than ``k``."""
    real = model.forward

    def forward(x):
        if x.shape[0] > k:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return real(x)

    model.forward = forward


def test_each_size_tried_runs_a_proxied_augmented_step_a_cam_pass_and_an_evaluation(tiny, monkeypatch):
    cfg, model, layer = tiny
    _fail_forward_above(model, 20)
    forwards, applied, augmented, explained = [], [], [], []
    model.register_forward_hook(lambda m, i, o: forwards.append(
        (i[0].shape[0], torch.is_grad_enabled(), m.training, i[0].is_contiguous(memory_format=torch.channels_last))))
    real_apply = ProxyState.apply

    def apply(self, indices, images, upto=None):
        proxied = sum(int(torch.isin(indices, layer.index).sum()) for layer in self.layers[:upto])
        applied.append((indices.numel(), proxied))
        return real_apply(self, indices, images, upto)

    monkeypatch.setattr(ProxyState, "apply", apply)
    real_input = train_mod.training_input
    monkeypatch.setattr(train_mod, "training_input", lambda x, g: augmented.append(x.shape[0]) or real_input(x, g))
    real_explain = proxy_mod.explain_batch
    monkeypatch.setattr(proxy_mod, "explain_batch",
                        lambda m, x, *a, **k: explained.append(x.shape[0]) or real_explain(m, x, *a, **k))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    bs = find_batch_size(cfg, model, layer, 3, torch.device("cpu"), Precision(None, None), True, limit=1000)

    assert bs == 16
    trained = [n for n, grad, training, _ in forwards if grad and training]
    assert trained == [2, 4, 8, 16]  # 32 was tried (augmented below) but cuDNN could not allocate
    assert all(cl for _, _, training, cl in forwards if training)  # channels-last input
    assert (2, 2) in applied and (16, 16) in applied  # a full batch of proxies rebuilt in the step
    assert augmented == [2, 4, 8, 16, 32]
    assert explained and set(explained) == {4}  # the proxy step's CAMs, method.batch_size at a time
    assert [n for n, grad, training, _ in forwards if not grad and not training] == [8] * 4  # evaluation
    # The trial's model is as it was: weights, buffers, mode, no gradients; its random stream untouched.
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_probe_keeps_headroom_from_the_measured_peak(tiny, monkeypatch):
    cfg, model, layer = tiny
    _fail_forward_above(model, 40)
    trained = []
    real_input = train_mod.training_input
    monkeypatch.setattr(train_mod, "training_input", lambda x, g: trained.append(x.shape[0]) or real_input(x, g))
    gauge = MemoryGauge(capacity=100, peak=lambda: 95 if trained[-1] == 32 else 50)
    assert find_batch_size(cfg, model, layer, 3, torch.device("cpu"), Precision(None, None), False, 1000,
                           gauge) == 16
    assert trained == [2, 4, 8, 16, 32, 64]


def test_nothing_fitting_names_the_part_that_ran_out(tiny, monkeypatch):
    cfg, model, layer = tiny

    def no_memory(*a, **k):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(proxy_mod, "explain_batch", no_memory)
    with pytest.raises(TrialError, match="method.batch_size"):
        find_batch_size(cfg, model, layer, 3, torch.device("cpu"), Precision(None, None), False, 1000)


def test_auto_on_a_gpu_searches_and_the_checkpoint_keeps_the_choice_on_resume(tmp_path, monkeypatch):
    from proxyattention.checkpoint import load

    cfg = _cfg(batch_size="auto", progress=False)
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.explain.enabled = False
    cfg.proxy.schedule = "1,p,1"
    searched = []

    def found(cfg, model, layer, num_classes, device, precision, channels_last, limit):
        searched.append((layer.name, channels_last, limit))
        return 24

    monkeypatch.setattr(train_mod, "find_batch_size", found)
    real_choose = train_mod.choose_batch_size

    def choose_as_on_cuda(cfg, model, data, device, precision, layer, channels_last):
        return real_choose(cfg, model, data, torch.device("cuda"), precision, layer, channels_last)

    monkeypatch.setattr(train_mod, "choose_batch_size", choose_as_on_cuda)
    out = tmp_path / "trial"
    first = train_mod.train(cfg, out)
    assert first["run"]["batch_size"] == 24 and first["device"]["batch_size"] == 24
    assert searched == [(first["run"]["target_layer"], False, first["data"]["train"])]
    assert load(out, first["trial_id"])["batch_size"] == 24
    # Started again in the same folder: the checkpoint's size, no second search.
    monkeypatch.setattr(train_mod, "find_batch_size", lambda *a, **k: pytest.fail("searched again on resume"))
    again = train_mod.train(cfg, out)
    assert again["resumed_from_epoch"] == 2 and again["run"]["batch_size"] == 24


@pytest.mark.parametrize("phase, target, key, value", [
    ("training", "train_epoch", "train.batch_size", 16),
    ("validation", "validate", "train.eval_batch_size", 8),
    ("the proxy step", "run_proxy_step", "method.batch_size", 4),
    ("testing", "evaluate", "train.eval_batch_size", 8),
    ("explainability", "explain_trial", "explain.batch_size", 128),
])
def test_running_out_of_memory_names_the_phase_and_the_setting_to_lower(tmp_path, monkeypatch, phase, target,
                                                                        key, value):
    import json

    cfg = _cfg(batch_size=16, progress=False)
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = "1,p,1"
    cfg.explain.images = 8
    real = getattr(train_mod, target)
    calls = []

    def fails_in_the_second_epoch_or_at_the_end(*args, **kwargs):
        calls.append(1)
        if target == "evaluate" and args[1] is not args[0].data.test:
            return real(*args, **kwargs)  # validation passes; the test set runs out
        if target in ("train_epoch", "validate") and len(calls) < 2:
            return real(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, target, fails_in_the_second_epoch_or_at_the_end)
    out = tmp_path / "trial"
    assert train_mod.run_trial(cfg, out) == 1
    error = json.loads((out / "error.json").read_text())
    at = {"training": "epoch 2", "validation": "epoch 2", "the proxy step": "epoch 1"}.get(phase, "after training")
    assert error["type"] == "TrialError"
    assert error["error"].startswith(f"out of memory in {phase} ({at}) at {key}={value}: rerun with ")
    assert f"{key}={value // 2}" in error["error"] and "\n" not in error["error"]
    assert ("train.batch_size=auto" in error["error"]) == (key == "train.batch_size")
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in error["traceback"]  # the cause is kept
    assert not (out / "result.json").exists()


def test_an_error_that_is_not_an_allocation_failure_keeps_its_own_message(tmp_path, monkeypatch):
    import json

    cfg = _cfg(batch_size=16, progress=False)
    cfg.dataset.cache_dir = str(tmp_path / "cache")

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)")

    monkeypatch.setattr(train_mod, "train_epoch", broken)
    out = tmp_path / "trial"
    assert train_mod.run_trial(cfg, out) == 1
    error = json.loads((out / "error.json").read_text())
    assert error["type"] == "RuntimeError" and error["error"].startswith("mat1 and mat2 shapes")
