"""Video members of shards (`mp4`, `webm`, `avi`, `mkv`, `mov`), read with PyAV, whose wheel ships FFmpeg: no
system FFmpeg is needed (torchcodec would need one).

Decoding a clip checks it and reads no frame but the first: the container opens, it has a video stream of a
sane size, its first frame decodes. The value is a `Video`, which decodes the frames a tower samples later
(`Video.frames`), so a worker holds K frames of a clip, never all of them. Frames past `max_seconds` are never
decoded: a long video is sampled over its first `max_seconds` only. A video's audio track becomes a `flac`
member when `make_shards` writes it, so the sample can feed an audio tower too.
Shape legend: T frames, H, W pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile
from PIL import Image

from .decode import BadSample, Decoder, ManifestError, file_suffix, read_member

# a frame of more pixels than PIL accepts for a picture is refused, as an oversized image is
MAX_FRAME_PIXELS = Image.MAX_IMAGE_PIXELS
DEFAULT_FPS = 25.0  # when a stream declares no rate
AUDIO_SUFFIX = "flac"


@dataclass(frozen=True)
class Video:
    """A checked video: its bytes, its container's suffix, and what its stream declares. `num_frames` is an
    estimate where the container keeps no count (webm, mkv): `frames` stands in the last frame for indices past
    the real end."""

    data: bytes
    suffix: str
    num_frames: int
    fps: float
    width: int
    height: int

    def frames(self, indices: list[int]) -> list[Image.Image]:
        """The frames at `indices` (ascending, repeats allowed) as RGB pictures, decoding the stream once up to
        the last index and stopping there."""
        want, end = set(indices), max(indices)
        got: dict[int, Image.Image] = {}
        last = None
        try:
            with open_container(self.data, self.suffix) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in want:
                        got[i] = frame.to_image()
                    last = frame
                    if i >= end:
                        break
                else:
                    if last is not None and len(got) < len(want):  # the stream ended early: its last frame stands in
                        tail = last.to_image()
                        got.update({i: tail for i in want if i not in got})
        except (av.FFmpegError, ValueError) as exc:
            raise BadSample("undecodable_video", str(exc)[:200]) from None
        if not got:
            raise BadSample("empty_video")
        return [got[i] for i in indices]

    def window(self, max_seconds: float) -> int:
        """How many frames lie in the first `max_seconds`: the span a tower samples from."""
        return max(1, min(self.num_frames, math.ceil(self.fps * max_seconds)))


# PyAV guesses a container from its bytes; these names help it where the guess can fail
_FORMATS = {"mkv": "matroska", "webm": "matroska", "avi": "avi"}


def open_container(data: bytes, suffix: str):
    """PyAV's container over a video file's bytes, reading it as `suffix` says where PyAV's guess can fail."""
    return av.open(io.BytesIO(data), format=_FORMATS.get(suffix))


class VideoDecoder(Decoder):
    modality = "video"
    suffixes = ("mp4", "webm", "avi", "mkv", "mov")

    def decode(self, sample: dict[str, Any]) -> Video:
        suffix = next(s for s in self.suffixes if s in sample)
        return probe(sample[suffix], suffix)

    def from_value(self, value: Any) -> Video:
        """A `Video`, or the bytes of a video file -> a checked `Video`."""
        if isinstance(value, Video):
            return value
        if isinstance(value, bytes | bytearray):
            return probe(bytes(value), "mp4")
        raise BadSample("undecodable_video", "a video is a file path or the bytes of a video file")

    def members(self, field: str, value: Any, base: Path) -> dict[str, Any]:
        """The video file, and its audio track as a `flac` member where it has one."""
        suffix = file_suffix(Path(str(value)))
        if suffix not in self.suffixes:
            raise ManifestError(f"{field} file '{value}' has suffix '{suffix}'; {field} takes {self.suffixes}")
        data = read_member(field, value, base)
        out = {suffix: data}
        try:
            sound = audio_track(data, suffix)
        except (av.FFmpegError, ValueError) as exc:
            raise ManifestError(f"{field} file '{value}' is not a readable video: {str(exc)[:200]}") from None
        if sound is not None:
            out[AUDIO_SUFFIX] = sound
        return out


def probe(data: bytes, suffix: str) -> Video:
    """A `Video` of `data`, or BadSample: undecodable_video (no container, no video stream, a first frame that
    does not decode), empty_video (no frame), video_too_large (frames over MAX_FRAME_PIXELS)."""
    if not data:
        raise BadSample("empty_video", "zero bytes")
    try:
        with open_container(data, suffix) as container:
            if not container.streams.video:
                raise BadSample("undecodable_video", "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_FRAME_PIXELS:
                raise BadSample("video_too_large", f"{width}x{height} frames")
            fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            first = next(container.decode(video=0), None)
            if first is None:
                raise BadSample("empty_video")
            frames = stream.frames
            if not frames:  # the container keeps no count: estimate it from the duration
                seconds = _seconds(stream, container)
                frames = max(1, round(seconds * fps)) if seconds else 1
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise BadSample("undecodable_video", str(exc)[:200]) from None
    return Video(data, suffix, int(frames), fps, int(width), int(height))


def _seconds(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return float(container.duration) / av.time_base if container.duration else 0.0


def audio_track(data: bytes, suffix: str) -> bytes | None:
    """The first audio stream of a video file as flac bytes (its own rate, channels kept), or None."""
    with open_container(data, suffix) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        planar = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in planar.resample(frame)]
        chunks += [f.to_ndarray() for f in planar.resample(None)]  # what the resampler still holds
    if not chunks or not rate:
        return None
    wave_CS = np.concatenate(chunks, axis=1)  # planar float32: (channels, samples)
    out = io.BytesIO()
    soundfile.write(out, wave_CS.T, rate, format="FLAC")
    return out.getvalue()
