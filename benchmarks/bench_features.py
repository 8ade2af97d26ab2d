"""Feature extraction speed: each backbone, decoding, and `sfr features` against the published route.

1. Backbones alone (inference, random weights, real input sizes): frames (clips) per second at
   batch 8 — TSN BNInception rgb (3x256x454) and flow (10x256x454), SlowFast R50 and R101 (32
   frames at 256x256). On CUDA also under bf16 autocast.
2. Decoding: frames/s of PyAV (and torchcodec, where it loads) decoding an H.264 video at the EPIC frame size (456x256) re-timed to
   30 fps, and of pillow reading + resizing EPIC jpg frames as the TSN recipe does.
3. End to end on the same frame folders, rgb TSN, in the steady state (after the first quarter): the published route (RU-LSTM FEATEXT example:
   one frame at a time, pillow transform, forward, one LMDB transaction per frame) against
   `sfr features` (decoding threads, batches of 8, one transaction per batch), side by side.

    nox -s bench       or       python benchmarks/bench_features.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

from featuredata import write_tsn_checkpoint  # noqa: E402

from sfr.errors import DataError  # noqa: E402
from sfr.features.extract import FramesWritten  # noqa: E402
from sfr.features.inputs import InputOptions  # noqa: E402
from sfr.features.request import FeatureRequest, run_request  # noqa: E402
from sfr.features.sources import VideoInput, open_frames  # noqa: E402
from sfr.features.video_torchcodec import load_torchcodec  # noqa: E402
from sfr.models.backbones.bninception import create_bninception  # noqa: E402
from sfr.models.backbones.slowfast import create_slowfast, pack_pathways  # noqa: E402

EPIC_SIZE = (256, 456)  # (height, width) of the published EPIC-KITCHENS frames


def per_second(run: Callable[[], int], min_seconds: float, sync: Callable[[], None]) -> float:
    """Items per second of `run` (which returns the items it processed), after one warm-up."""
    run()
    sync()
    items, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        items += run()
        sync()
    return items / (time.perf_counter() - start)


def backbone_rates(device: str, batch: int, min_seconds: float, quick: bool) -> list[tuple]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    nets: list[tuple[str, torch.nn.Module, Callable[[], torch.Tensor], Callable]] = [
        (
            "TSN BNInception rgb 3x256x454",
            create_bninception(in_channels=3),
            lambda: torch.randn(batch, 3, 256, 454, device=device),
            lambda net, x: net(x),
        ),
        (
            "TSN BNInception flow 10x256x454",
            create_bninception(in_channels=10),
            lambda: torch.randn(batch, 10, 256, 454, device=device),
            lambda net, x: net(x),
        ),
        (
            "SlowFast R50 32x256x256",
            create_slowfast(model_depth=50),
            lambda: torch.randn(batch, 3, 32, 256, 256, device=device),
            lambda net, x: net(pack_pathways(x)),
        ),
    ]
    if not quick:
        nets.append(
            (
                "SlowFast R101 32x256x256",
                create_slowfast(model_depth=101),
                lambda: torch.randn(batch, 3, 32, 256, 256, device=device),
                lambda net, x: net(pack_pathways(x)),
            )
        )
    precisions = ["fp32", "bf16"] if device.startswith("cuda") else ["fp32"]
    rows = []
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False  # fp32 rows are true fp32, as sfr features runs them
    for name, net, make, forward in nets:
        net = net.eval().to(device)
        x = make()
        if device.startswith("cuda"):  # the layout sfr features uses on CUDA
            layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
            net, x = net.to(memory_format=layout), x.contiguous(memory_format=layout)
        for precision in precisions:
            context = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if precision == "bf16"
                else torch.autocast("cpu", enabled=False)
            )

            def run(net=net, x=x, forward=forward, context=context) -> int:
                with torch.inference_mode(), context:
                    forward(net, x)
                return batch

            rows.append((name, precision, per_second(run, min_seconds, sync)))
        del net, x
    return rows


def write_epic_frames(folder: Path, frames: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(*EPIC_SIZE, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for frame in range(1, frames + 1):
        image = np.roll(base, frame * 3, axis=1)
        Image.fromarray(image).save(folder / f"frame_{frame:010d}.jpg", quality=90)
    return folder


def write_epic_video(path: Path, frames: int) -> Path:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(*EPIC_SIZE, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=60)
        stream.height, stream.width = EPIC_SIZE
        stream.pix_fmt = "yuv420p"
        for frame in range(frames):
            image = av.VideoFrame.from_ndarray(np.roll(base, frame * 3, axis=1), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoding_rates(work: Path, frames: int, min_seconds: float) -> list[tuple]:
    video = write_epic_video(work / "video.mp4", frames * 2)  # 60 fps → `frames` at 30 fps
    folder = write_epic_frames(work / "frames" / "V", frames)

    def pyav() -> int:
        reader = open_frames(VideoInput("video", video, "video"))
        return sum(1 for _ in reader.read(None))

    def jpeg() -> int:
        for path in sorted(folder.iterdir()):
            Image.open(path).convert("RGB").resize((454, 256), Image.BILINEAR)
        return frames

    def torchcodec() -> int:
        reader = open_frames(VideoInput("video", video, "video"), backend="torchcodec")
        return sum(1 for _ in reader.read(None))

    sync = lambda: None  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the extraction's decoding threads
    try:
        rows = [("PyAV decode 456x256 H.264, 60→30 fps", per_second(pyav, min_seconds, sync))]
        try:
            load_torchcodec()
        except DataError as error:
            print(f"torchcodec row skipped: {error.message}")
        else:
            rate = per_second(torchcodec, min_seconds, sync)
            rows.append(("torchcodec decode, same video", rate))
        rows.append(("pillow jpg read + TSN resize", per_second(jpeg, min_seconds, sync)))
    finally:
        torch.set_num_threads(threads)
    return rows


def published_route(folders: list[Path], weights: Path, out: Path, device: str) -> float:
    """The RU-LSTM FEATEXT rgb example's loop: frame by frame, one transaction per frame."""
    from sfr.models.backbones.bninception import load_tsn_weights

    net = create_bninception(in_channels=3)
    load_tsn_weights(net, weights)
    net = net.eval().to(device)
    mean = torch.tensor([104.0, 117.0, 128.0], device=device).view(3, 1, 1)
    env = lmdb.open(str(out), map_size=1 << 30)
    paths = [path for folder in folders for path in sorted(folder.iterdir())]
    marks: list[tuple[float, int]] = []
    for done, path in enumerate(paths, start=1):
        image = Image.open(path).resize((454, 256), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).to(device)
        x = x[[2, 1, 0]] * 255 - mean
        with torch.no_grad():
            feature = net(x[None]).squeeze().cpu().numpy()
        with env.begin(write=True) as txn:
            txn.put(f"{path.parent.name}_{path.name}".encode(), feature.tobytes())
        marks.append((time.perf_counter(), done))
    env.close()
    return steady_rate(marks)


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Frames/s between the first quarter of the frames and the last: start-up (cuDNN autotuning,
    thread start) is left out of both routes alike."""
    total = marks[-1][1]
    start = next(mark for mark in marks if mark[1] >= total // 4)
    end = marks[-1]
    return (end[1] - start[1]) / (end[0] - start[0])


def end_to_end(
    work: Path, frames: int, device: str, batch: int, workers: int
) -> tuple[float, float]:
    """frames/s of both routes over `workers` videos of `frames / workers` frames each."""
    folders = [
        write_epic_frames(work / "e2e" / f"P01_{v:02d}", frames // workers)
        for v in range(1, workers + 1)
    ]
    weights = work / "TSN-rgb.pth.tar"
    write_tsn_checkpoint(weights, in_channels=3)
    published = published_route(folders, weights, work / "published", device)
    marks: list[tuple[float, int]] = []

    def mark(event: object) -> None:
        if isinstance(event, FramesWritten):
            marks.append((time.perf_counter(), event.written))

    run_request(
        FeatureRequest(
            modality="rgb",
            out=work / "sfr",
            inputs=InputOptions(videos=work / "e2e"),
            weights=weights,
            batch_size=batch,
            workers=workers,
            device=device,
        ),
        mark,
    )
    return published, steady_rate(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum time per measure")
    parser.add_argument("--frames", type=int, default=48, help="frames of the end-to-end run")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads end to end")
    parser.add_argument("--quick", action="store_true", help="skip SlowFast R101")
    args, _ = parser.parse_known_args()  # nox passes the same arguments to every benchmark
    device = args.device
    name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"sfr features benchmark on {name} (torch {torch.__version__}), batch {args.batch}\n")
    print(f"{'backbone':36} {'precision':>9} {'frames/s':>10}")
    for row_name, precision, rate in backbone_rates(device, args.batch, args.seconds, args.quick):
        print(f"{row_name:36} {precision:>9} {rate:10.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"\n{'decoding (one thread)':36} {'':>9} {'frames/s':>10}")
        for row_name, rate in decoding_rates(work, 150, args.seconds):
            print(f"{row_name:36} {'':>9} {rate:10.1f}", flush=True)
        published, ours = end_to_end(work, args.frames, device, args.batch, args.workers)
    print(f"\nend to end, TSN rgb, {args.frames} EPIC-size jpg frames ({device}):")
    print(
        f"  published route (frame by frame)   {published:8.1f} frames/s  {1000 / published:7.1f} ms/frame"
    )
    label = f"sfr features (batch {args.batch}, {args.workers} threads)"
    print(f"  {label:34} {ours:8.1f} frames/s  {1000 / ours:7.1f} ms/frame")
    print(f"  speed-up                           {ours / published:8.2f}x")


if __name__ == "__main__":
    main()
