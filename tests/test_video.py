"""Video decoding with PyAV, re-timed to 30 fps (the rule of FFmpeg's fps filter, round=up)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from sfr.errors import DataError
from sfr.features import video as video_module
from sfr.features.video import VideoFileReader

WIDTH, HEIGHT, BLOCK = 64, 48, 16
BITS = (HEIGHT // BLOCK) * (WIDTH // BLOCK)  # 12 bits: source frames 0..4095


def code_image(index: int) -> np.ndarray:
    """A frame showing its 0-based source index in binary, one black or white 16x16 block a bit
    (aligned on the codec's macroblocks, so compression cannot flip a bit)."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        row, col = divmod(bit, WIDTH // BLOCK)
        if index >> bit & 1:
            image[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK] = 255
    return image


def source_index(image: np.ndarray) -> int:
    """The source index a decoded frame shows."""
    grey = image.astype(np.float32).mean(axis=2)
    index = 0
    for bit in range(BITS):
        row, col = divmod(bit, WIDTH // BLOCK)
        if grey[row * BLOCK : (row + 1) * BLOCK, col * BLOCK : (col + 1) * BLOCK].mean() > 128:
            index |= 1 << bit
    return index


def write_video(
    path: Path,
    frames: int,
    rate: int | Fraction,
    *,
    codec: str = "libx264",
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    gop: int | None = None,
) -> Path:
    """A small video whose frame i shows code_image(i); `pts` (in `time_base`) for variable rate."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if gop is not None:
            stream.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(code_image(index), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[index], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


VFR_PTS = [0, 10, 100, 110, 300, 301, 302, 450, 600, 633]  # milliseconds


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    ms = Fraction(1, 1000)
    return {
        "25": write_video(folder / "v25.mp4", 50, 25),
        "60": write_video(folder / "v60.mp4", 120, 60),
        "60mkv": write_video(folder / "v60.mkv", 120, 60),
        "ntsc": write_video(folder / "ntsc.mp4", 48, Fraction(24000, 1001)),
        "mpeg4": write_video(folder / "v25.avi", 50, 25, codec="mpeg4"),
        "vfr": write_video(folder / "vfr.mp4", len(VFR_PTS), 30, pts=VFR_PTS, time_base=ms),
        "long": write_video(folder / "long.mp4", 750, 25, gop=25),
    }


def shown(reader: VideoFileReader, wanted: list[int] | None = None) -> list[tuple[int, int]]:
    return [(frame, source_index(image)) for frame, image in reader.read(wanted)]


def expected_constant(frames: int, rate: Fraction) -> list[tuple[int, int]]:
    """Keyed frame n shows source floor((n - 1) / 30 * rate), while (n - 1) / 30 < frames / rate."""
    result = []
    n = 1
    while Fraction(n - 1, 30) < frames / rate:
        result.append((n, int(Fraction(n - 1, 30) * rate)))
        n += 1
    return result


def test_25_fps_repeats_every_fifth_frame(videos: dict[str, Path]) -> None:
    reader = VideoFileReader(videos["25"], name="v25")
    assert reader.frame_count() == 60  # estimated from the duration before reading
    result = shown(reader)
    assert result == expected_constant(50, Fraction(25))
    (_, image), *_ = reader.read([1])
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8 and image.flags.writeable
    assert [index for _, index in result[:13]] == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]
    assert len(result) == 60 and reader.frame_count() == 60


@pytest.mark.parametrize("key", ["60", "60mkv"])
def test_60_fps_keeps_every_second_frame(videos: dict[str, Path], key: str) -> None:
    # In Matroska timestamps are whole milliseconds (frame 4 is stamped 67 ms for 66.67 ms):
    # the half-tick tolerance keeps the exact every-second-frame pattern.
    result = shown(VideoFileReader(videos[key], name="v60"))
    assert result == [(n, 2 * (n - 1)) for n in range(1, 61)]


def test_frame_rate_of_ntsc_film(videos: dict[str, Path]) -> None:
    result = shown(VideoFileReader(videos["ntsc"], name="ntsc"))
    assert result == expected_constant(48, Fraction(24000, 1001))
    assert len(result) == 61  # 48 frames last 2.002 s


def test_mpeg4_avi(videos: dict[str, Path]) -> None:
    assert shown(VideoFileReader(videos["mpeg4"], name="avi")) == expected_constant(50, 25)


def test_variable_frame_rate_shows_the_frame_on_screen(videos: dict[str, Path]) -> None:
    result = shown(VideoFileReader(videos["vfr"], name="vfr"))
    times = [Fraction(p, 1000) for p in VFR_PTS]
    last_duration = Fraction(1, 30)  # the stream's nominal rate
    expected = []
    n = 1
    while Fraction(n - 1, 30) < times[-1] + last_duration:
        t = Fraction(n - 1, 30)
        expected.append((n, max(i for i, time in enumerate(times) if time <= t)))
        n += 1
    assert result == expected
    assert result[:5] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]


def ffmpeg_fps_filter(path: Path, rounding: str) -> list[int]:
    """Source indices that FFmpeg's `fps=30:round=...` filter outputs (through PyAV's graph)."""
    indices: list[int] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        source = graph.add_buffer(template=stream)
        fps = graph.add("fps", f"fps=30:round={rounding}")
        sink = graph.add("buffersink")
        source.link_to(fps)
        fps.link_to(sink)
        graph.configure()

        def drain() -> None:
            while True:
                try:
                    frame = sink.pull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    return
                indices.append(source_index(frame.to_ndarray(format="rgb24")))

        for frame in container.decode(stream):
            source.push(frame)
            drain()
        source.push(None)
        drain()
    return indices


@pytest.mark.parametrize("key", ["25", "ntsc", "vfr"])
def test_agrees_with_ffmpeg_fps_filter_round_up(videos: dict[str, Path], key: str) -> None:
    ours = [index for _, index in shown(VideoFileReader(videos[key], name=key))]
    assert ours == ffmpeg_fps_filter(videos[key], "up")


def test_sparse_read_equals_full_read(videos: dict[str, Path]) -> None:
    reader = VideoFileReader(videos["25"], name="v25")
    full = dict(reader.read())
    rng = np.random.default_rng(0)
    for _ in range(5):
        wanted = sorted(rng.choice(np.arange(1, 70), size=12, replace=False).tolist())
        sparse = list(reader.read(wanted))
        assert [n for n, _ in sparse] == [n for n in wanted if n <= 60]
        for frame, image in sparse:
            assert np.array_equal(image, full[frame])
    assert [n for n, _ in reader.read([61, 100])] == []
    assert [n for n, _ in reader.read([60, 59, 59])] == [59, 60]


def test_repeated_frames_are_separate_arrays(videos: dict[str, Path]) -> None:
    frames = list(VideoFileReader(videos["25"], name="v25").read([7, 8]))  # both source 5
    first, second = frames[0][1], frames[1][1]
    assert source_index(first) == 5
    assert np.array_equal(first, second) and first is not second
    first[:] = 0
    assert second.any()


class SpyContainer:
    """A PyAV container that counts seeks and can make them overshoot."""

    def __init__(self, container: Any, log: dict[str, int], overshoot: int = 0) -> None:
        self._container = container
        self._log = log
        self._overshoot = overshoot
        self.streams = container.streams

    def decode(self, stream: Any) -> Iterator[Any]:
        return self._container.decode(stream)

    def seek(self, offset: int, **kwargs: Any) -> None:
        self._log["seeks"] = self._log.get("seeks", 0) + 1
        self._container.seek(offset + self._overshoot, **kwargs)

    def close(self) -> None:
        self._container.close()


def spy_on(monkeypatch: pytest.MonkeyPatch, log: dict[str, int], overshoot: int = 0) -> None:
    """Count seeks and RGB conversions; seeks land `overshoot` ticks after the asked time."""
    real_open = VideoFileReader._open
    real_convert = video_module.RGBConverter.__call__

    def spying_open(self: VideoFileReader) -> tuple[Any, Any]:
        container, stream = real_open(self)
        return SpyContainer(container, log, overshoot), stream

    def counting_convert(self: Any, frame: Any) -> np.ndarray:
        log["converted"] = log.get("converted", 0) + 1
        return real_convert(self, frame)

    monkeypatch.setattr(VideoFileReader, "_open", spying_open)
    monkeypatch.setattr(video_module.RGBConverter, "__call__", counting_convert)


def test_sparse_read_converts_only_the_frames_it_yields(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    log: dict[str, int] = {}
    spy_on(monkeypatch, log)
    frames = list(VideoFileReader(videos["60"], name="v60").read([3, 4, 40]))
    assert [n for n, _ in frames] == [3, 4, 40]
    assert log["converted"] == 3


def test_seeking_gives_the_images_of_a_full_decode(videos: dict[str, Path]) -> None:
    reader = VideoFileReader(videos["long"], name="long")  # 30 s at 25 fps, a key frame a second
    full = dict(reader.read())
    assert len(full) == 900 and reader.seeks == 0
    for wanted in ([1, 5, 400, 401, 700, 899, 900, 901], [350, 351, 800], [899], [2, 500, 501]):
        sparse = list(reader.read(wanted))
        assert reader.seeks >= 1
        assert [n for n, _ in sparse] == [n for n in wanted if n <= 900]
        for frame, image in sparse:
            assert np.array_equal(image, full[frame]), frame
    assert source_index(full[800]) == 799 * 25 // 30


def test_a_seek_that_overshoots_decodes_from_the_start(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = VideoFileReader(videos["long"], name="long")
    full = dict(reader.read())
    log: dict[str, int] = {}
    spy_on(monkeypatch, log, overshoot=5 * 12800)  # lands 5 s after the asked time
    sparse = list(reader.read([2, 400, 401, 880]))
    assert log["seeks"] == 1  # after the overshoot, one decode from the start without seeking
    assert [n for n, _ in sparse] == [2, 400, 401, 880]
    for frame, image in sparse:
        assert np.array_equal(image, full[frame]), frame


def test_random_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    reader = VideoFileReader(path, name="broken")
    with pytest.raises(DataError) as caught:
        list(reader.read())
    assert str(path) in caught.value.message and caught.value.hint
    with pytest.raises(DataError, match=r"broken\.mp4"):
        reader.frame_count()


def test_truncated_video_is_refused(videos: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "cut.mp4"
    path.write_bytes(videos["long"].read_bytes()[:20000])  # mp4 index (moov) is at the end
    with pytest.raises(DataError, match=r"cut\.mp4"):
        list(VideoFileReader(path, name="cut").read([1]))


def write_cut_short(path: Path, keep: float) -> Path:
    """A 3 s video whose file was cut after `keep` of its bytes by an interrupted copy, with its
    header intact: an mp4 with its index first (`-movflags +faststart`) or a Matroska file."""
    options = {"movflags": "faststart"} if path.suffix == ".mp4" else {}
    rng = np.random.default_rng(2)
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(90):
            image = code_image(index) // 2 + rng.integers(0, 64, (HEIGHT, WIDTH, 3), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_video_cut_short_with_its_header_is_refused(tmp_path: Path, suffix: str) -> None:
    """FFmpeg's threaded decoder stops quietly at the cut; the declared 3 s give it away."""
    path = write_cut_short(tmp_path / f"cut{suffix}", 0.5)
    reader = VideoFileReader(path, name="cut")
    assert reader.frame_count() == 90  # what the header says
    with pytest.raises(
        DataError, match=r"stops at 1\.\d+ s, but its container says it lasts 3\.00 s"
    ):
        list(reader.read())
    with pytest.raises(DataError, match="truncated"):
        list(reader.read([80]))  # a sparse read that reaches the cut
    assert [n for n, _ in reader.read([1, 2])] == [1, 2]  # frames before the cut are readable
    whole = write_cut_short(tmp_path / f"whole{suffix}", 1.0)
    assert len(list(VideoFileReader(whole, name="whole").read())) == 90


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(DataError, match="no video stream"):
        list(VideoFileReader(path, name="sound").read())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(VideoFileReader(tmp_path / "gone.mp4", name="gone").read())


def test_without_pyav(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError, match=r"(?s)needs PyAV .*pip install -e \"\.\[video\]\""):
        list(VideoFileReader(videos["25"], name="v25").read())


def set_rotation(path: Path, degrees: int) -> Path:
    """Give an mp4 the display matrix of a phone video turned by `degrees` (counter-clockwise,
    as FFmpeg reports it): the track header's matrix, which is where phones record it."""
    one, minus = 0x00010000, 0xFFFF0000
    a, b, c, d = {90: (0, minus, one, 0), 180: (minus, 0, 0, minus), 270: (0, one, minus, 0)}[
        degrees
    ]
    data = bytearray(path.read_bytes())
    box = data.index(b"tkhd")
    version = data[box + 4]
    matrix = box + 8 + (20 if version == 0 else 32) + 16
    data[matrix : matrix + 36] = struct.pack(">9I", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_phone_video_is_turned_upright(tmp_path: Path, degrees: int) -> None:
    """As `ffmpeg -i` autorotates: a 90° display matrix turns the image a quarter counter-clockwise."""
    plain = write_video(tmp_path / "plain.mp4", 10, 30)
    turned = set_rotation(write_video(tmp_path / "turned.mp4", 10, 30), degrees)
    upright = dict(VideoFileReader(plain, name="plain").read())
    for frame, image in VideoFileReader(turned, name="turned").read():
        expected = np.rot90(upright[frame], degrees // 90)
        assert image.shape == expected.shape and np.array_equal(image, expected), frame
        assert image.flags.c_contiguous


def test_rgb_conversion_of_8_bit_video_is_unchanged(tmp_path: Path) -> None:
    """FFmpeg's format filter gives, on 8-bit video, exactly PyAV's own conversion."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(8):
            image = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        direct = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    ours = [image for _, image in VideoFileReader(path, name="noise").read()]
    assert len(ours) == len(direct) == 8
    for mine, theirs in zip(ours, direct, strict=True):
        assert np.array_equal(mine, theirs)


def write_trimmed(source: Path, path: Path, seconds: Fraction) -> Path:
    """`ffmpeg -ss SECONDS -i SOURCE -c copy PATH` without re-encoding: the packets from the key
    frame before the cut, shifted so the cut is at 0; the mp4 muxer writes an edit list and
    the frames before the cut are marked to be discarded."""
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        cut = int(seconds / Fraction(stream.time_base))
        first_key = max(
            p.pts for p in container.demux(stream) if p.size and p.is_keyframe and p.pts <= cut
        )
    with av.open(str(source)) as container, av.open(str(path), "w") as out:
        stream = container.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in container.demux(stream):
            if packet.size and packet.pts >= first_key:
                packet.pts, packet.dts = packet.pts - cut, packet.dts - cut
                packet.stream = copy
                out.mux(packet)
    return path


def write_10_bit(path: Path, frames: int) -> Path:
    """A 10-bit H.264 video of random images (yuv420p10le, as cameras record HDR)."""
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p10le"
        for _ in range(frames):
            image = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p10le")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_trimmed_video_starts_at_its_cut(videos: dict[str, Path], tmp_path: Path) -> None:
    """A lossless trim at 1.1 s of the 25 fps video: the first frame shown is source 28 (1.12 s),
    the frames before the cut that the file still holds are not shown."""
    trimmed = write_trimmed(videos["long"], tmp_path / "trim.mp4", Fraction(11, 10))
    result = shown(VideoFileReader(trimmed, name="trim"))
    assert result[:8] == [(1, 28), (2, 28), (3, 29), (4, 30), (5, 31), (6, 32), (7, 33), (8, 33)]
    assert len(result) == 867  # 722 frames from 0.02 s to 28.9 s
