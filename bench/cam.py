"""Native CAM path vs pytorch-grad-cam: time for one batch, side by side in one process.

Set-up (fixed, so figures compare across commits): resnet18 (pretrained=False, 10 classes), batch 64,
64 px, CPU, eval-time CAMs of random targets. Each repeat times the native path and the library on the
same batch, alternating, after a warm-up; the figure is the ratio of the medians. Other processes on
the machine move the absolute times a lot; the alternation keeps the ratio steadier.

    python bench/cam.py [--repeats 7] [--threads 0] [--clock wall|cpu]

Prints ``FIGURE cam_time_ratio <native / library> (target <= 0.33)`` for GradCAM++ and one
``FIGURE cam_time_ratio_<method>`` line for GradCAM and EigenGradCAM, plus the maximum difference
between the two implementations' maps (they should agree to 1e-4). For GradCAM++ two more lines say
where the gain comes from: the native path with NCHW input (no channels-last), and the library given
channels-last input too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from proxyattention.cam import compute_cams
from proxyattention.models import build_model, find_target_layer

MODEL, NUM_CLASSES, BATCH, IMAGE_SIZE = "resnet18", 10, 64, 64


def _time(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--methods", default="gradcampp,gradcam,eigengradcam")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier on a shared machine (use --threads 1)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = SimpleNamespace(name=MODEL, pretrained=False, weights=None)
    model = build_model(cfg, NUM_CLASSES, IMAGE_SIZE)
    target = find_target_layer(model, IMAGE_SIZE)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    targets = torch.randint(0, NUM_CLASSES, (BATCH,))
    print(f"# {MODEL} batch {BATCH} at {IMAGE_SIZE} px on CPU ({torch.get_num_threads()} threads), "
          f"target layer {target.name} {target.map_hw[0]}x{target.map_hw[1]}, "
          f"{args.clock} clock, median of {args.repeats} after warm-up")

    images_cl = images.contiguous(memory_format=torch.channels_last)
    for method in args.methods.split(","):
        def run(impl: str, channels_last: bool | None = None, x: torch.Tensor = images) -> torch.Tensor:
            return compute_cams(model, x, targets, method, target, impl=impl, batch_size=BATCH,
                                channels_last=channels_last)

        native_maps, library_maps = run("native"), run("library")  # also the warm-up
        diff = (native_maps - library_maps).abs().max().item()
        note = ""
        if method in ("eigencam", "eigengradcam"):  # equal up to the sign the native path orients
            from proxyattention.cam import explain_batch, to_input_size

            layer = explain_batch(model, images, targets, method, target, impl="native", at="layer").maps
            flipped = to_input_size(-layer, tuple(images.shape[-2:]))
            diff = torch.minimum((native_maps - library_maps).abs().amax(dim=(1, 2)),
                                 (flipped - library_maps).abs().amax(dim=(1, 2))).max().item()
            note = " (up to the projection's sign)"
        runs = {  # alternated within each repeat, so load from other processes hits all alike
            "native": lambda: run("native"),
            "library": lambda: run("library"),
            "native_nchw": lambda: run("native", channels_last=False),
            "library_cl_input": lambda: run("library", x=images_cl),
        }
        if method != "gradcampp":  # the layout comparison once is enough
            runs = {k: runs[k] for k in ("native", "library")}
        for fn in runs.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                times[key].append(_time(fn, clock))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["native"] / med["library"]
        print(f"# {method}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in med.items())
              + f"; max |native - library|{note} {diff:.1e}")
        if method == "gradcampp":
            print(f"FIGURE cam_time_ratio {ratio:.3f} (target <= 0.33)")
            print(f"FIGURE cam_time_ratio_nchw {med['native_nchw'] / med['library']:.3f} "
                  "(native forced to NCHW input)")
            print(f"FIGURE cam_time_ratio_both_channels_last "
                  f"{med['native'] / med['library_cl_input']:.3f} (library also given channels-last input)")
        else:
            print(f"FIGURE cam_time_ratio_{method} {ratio:.3f}")

if __name__ == "__main__":
    main()
