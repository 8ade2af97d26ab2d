"""GPU check of `sfr features`: CPU fp32 and CUDA fp32/bf16/fp16 stores of the same frames agree.

Writes EPIC-size frame folders (256x456) and synthetic checkpoints in the published containers,
extracts TSN rgb (every frame) and SlowFast R50 (published 32x256x256 clips, 5 fps) once on the
CPU and once per CUDA precision, and prints the largest difference relative to the largest
feature value. Exits 1 when CUDA fp32 differs by more than 1e-3 of the scale.

    python benchmarks/check_features_gpu.py          (on a machine with a CUDA device)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_features import write_epic_frames  # noqa: E402
from featuredata import write_slowfast_checkpoint, write_tsn_checkpoint  # noqa: E402

from sfr.features.inputs import InputOptions  # noqa: E402
from sfr.features.plan import FramePlan  # noqa: E402
from sfr.features.request import FeatureRequest, run_request  # noqa: E402


def read(store: Path) -> dict[bytes, np.ndarray]:
    env = lmdb.open(str(store), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k): np.frombuffer(v, np.float32).copy() for k, v in txn.cursor()}
    env.close()
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for video in ("P01_01", "P01_02"):
            write_epic_frames(work / "videos" / video, 40)
        cases = {
            "tsn-bninception": (write_tsn_checkpoint, {}, FramePlan()),
            "slowfast-r50": (write_slowfast_checkpoint, {}, FramePlan(subsample_fps=5)),
        }
        for backbone, (write, overrides, plan) in cases.items():
            weights = work / f"{backbone}.weights"
            if backbone == "tsn-bninception":
                write(weights, in_channels=3)
            else:
                write(weights, depth=50)
            stores = {}
            for device, precision in (
                ("cpu", "fp32"),
                ("cuda", "fp32"),
                ("cuda", "bf16"),
                ("cuda", "fp16"),
            ):
                out = work / f"{backbone}-{device}-{precision}"
                start = time.perf_counter()
                result = run_request(
                    FeatureRequest(
                        modality="rgb",
                        out=out,
                        inputs=InputOptions(videos=work / "videos"),
                        backbone=backbone,
                        weights=weights,
                        preprocessing=overrides,
                        plan=plan,
                        batch_size=16,
                        workers=2,
                        device=device,
                        precision=precision,
                    )
                )
                seconds = time.perf_counter() - start
                assert not result.failed, result.failed
                stores[(device, precision)] = read(out)
                print(
                    f"{backbone:16} {device:4} {precision}: {result.written} vectors, "
                    f"{result.frames_per_s:8.1f} frames/s ({seconds:.1f} s with start-up)"
                )
            reference = stores[("cpu", "fp32")]
            scale = max(float(np.abs(v).max()) for v in reference.values())
            for key, store in stores.items():
                if key == ("cpu", "fp32"):
                    continue
                assert store.keys() == reference.keys()
                diff = max(float(np.abs(store[k] - reference[k]).max()) for k in reference)
                print(
                    f"  {key[0]} {key[1]} vs cpu fp32: max |diff| / max |value| = {diff / scale:.2e}"
                )
                if key == ("cuda", "fp32"):
                    worst = max(worst, diff / scale)
    print("\nOK" if worst <= 1e-3 else f"\nFAILED: cuda fp32 differs by {worst:.2e}")
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
