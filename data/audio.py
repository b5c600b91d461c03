"""Audio members of shards, decoded with soundfile (no FFmpeg needed) to a mono float32 waveform and its rate.

The waveform -> log-mel transform belongs to the audio encoders (`tessera.models.audio_features`), since its
parameters (rate, clip length, mel bins) are part of the model's architecture.
Shape legend: C channels, S samples.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile

from .decode import BadSample, Decoder, torch_module

if TYPE_CHECKING:
    import torch

SILENCE = 1e-5  # peak amplitude below which a clip is silent


class AudioDecoder(Decoder):
    """`flac`, `wav`, `ogg` (and `mp3`, which libsndfile >= 1.1 reads) members, via soundfile."""

    modality = "audio"
    suffixes = ("flac", "wav", "ogg", "mp3")

    def from_value(self, value: Any) -> tuple[torch.Tensor, int]:
        """A (waveform, sample_rate) pair, the waveform any array of samples (mono, or channels mixed down) ->
        (float32 mono tensor, rate), as `decode` gives it."""
        torch = torch_module()
        if not (isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[1], int | np.integer)):
            raise BadSample("undecodable_audio", "audio is a (waveform, sample_rate) pair or a file path")
        array, rate = np.asarray(value[0].cpu() if isinstance(value[0], torch.Tensor) else value[0]), int(value[1])
        if rate <= 0 or array.ndim not in (1, 2) or array.size == 0:
            raise BadSample("undecodable_audio", f"a waveform of shape {array.shape} at {rate} Hz")
        wave = torch.as_tensor(array, dtype=torch.float32)
        if np.issubdtype(array.dtype, np.integer):  # PCM: full scale is [-1, 1], as soundfile reads files
            wave = wave / float(np.iinfo(array.dtype).max + 1)
        if wave.ndim == 2:  # (samples, channels) or (channels, samples): the shorter side is the channels
            wave = wave.mean(1 if wave.shape[1] <= wave.shape[0] else 0)
        return wave, rate

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        suffix = next(s for s in self.suffixes if s in sample)
        try:
            wave_SC, rate = soundfile.read(io.BytesIO(sample[suffix]), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError, TypeError, ValueError) as exc:
            raise BadSample("undecodable_audio", str(exc)[:200]) from None
        if wave_SC.shape[0] == 0 or rate <= 0:
            raise BadSample("empty_audio")
        wave_SC = torch_module().from_numpy(wave_SC)
        wave_S = wave_SC[:, 0] if wave_SC.shape[1] == 1 else wave_SC.mean(1)  # mix down to mono
        peak = float(wave_S.abs().max())  # NaN when any sample is NaN: one pass checks both
        if not math.isfinite(peak):
            raise BadSample("undecodable_audio", "non-finite samples")
        if peak < SILENCE:
            raise BadSample("silent_audio")
        return wave_S, int(rate)
