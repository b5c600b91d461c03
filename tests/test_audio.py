"""Audio decoding from shard bytes and the log-mel transform: formats, rates, channels, lengths, bad clips."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile
import torch

from tessera.data import BadSample
from tessera.modalities import decoder
from tessera.models.audio_features import AudioConfig, AudioTransform


def _tone(seconds, rate, channels=1, freq=440.0, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * math.pi * freq * t).astype(np.float32)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


def _encode(wave, rate, fmt):
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt.upper(), **({"subtype": "VORBIS"} if fmt == "ogg" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("rate,channels", [(8000, 1), (16000, 2), (44100, 2)])
def test_decode_mixes_down_to_mono_at_the_file_rate(fmt, rate, channels):
    wave = _tone(0.5, rate, channels)
    decoded, got_rate = decoder("audio").decode({fmt: _encode(wave, rate, fmt)})
    assert got_rate == rate and decoded.dtype == torch.float32
    assert decoded.shape == (wave.shape[0],) or (fmt == "mp3" and abs(decoded.shape[0] - wave.shape[0]) < 2 * 1152)
    if fmt in ("wav", "flac"):  # lossless
        assert torch.allclose(decoded, torch.from_numpy(wave.mean(1)), atol=1e-3)
    else:  # lossy codecs: the same tone, near enough (mp3 may also shift it by its encoder delay)
        assert abs(decoded.pow(2).mean().sqrt() - float(np.sqrt((wave.mean(1) ** 2).mean()))) < 0.05


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_transform_resamples_crops_and_makes_log_mel(rate):
    cfg = AudioConfig(sample_rate=16000, clip_seconds=1.0, n_mels=32, eval_crops=3)
    wave = torch.from_numpy(_tone(2.5, rate)[:, 0])
    train = AudioTransform(cfg, is_train=True)((wave, rate))
    evaluation = AudioTransform(cfg, is_train=False)((wave, rate))
    assert train.shape == (32, cfg.frames) and evaluation.shape == (3, 32, cfg.frames)
    assert torch.isfinite(train).all() and torch.isfinite(evaluation).all()
    # a 440 Hz tone at any input rate: the loudest mel bin is the one centred near 440 Hz
    fb = AudioTransform(cfg, False).mel.mel_scale.fb  # (n_fft // 2 + 1, n_mels)
    centre_hz = fb.argmax(0).float() * (cfg.sample_rate / 2) / (fb.shape[0] - 1)
    energy = evaluation[0].mean(1)
    assert abs(centre_hz[energy.argmax()] - 440) < 80
    assert energy.max() > energy.median() + 20  # dB


def test_short_clips_are_repeat_padded_and_eval_is_deterministic():
    cfg = AudioConfig(sample_rate=8000, clip_seconds=1.0)
    tf = AudioTransform(cfg, is_train=False)
    wave = torch.linspace(0.1, 1.0, 3000)
    padded = tf.waveform(wave, 8000)
    assert padded.shape == (8000,) and torch.equal(padded[3000:6000], wave)
    assert torch.equal(tf((wave, 8000)), tf((wave, 8000)))


def test_presets_fill_in_what_the_config_does_not_set():
    from tessera.config import ConfigError, from_dict, to_dict

    clap = from_dict(AudioConfig, {"preset": "clap"})
    ib = from_dict(AudioConfig, {"preset": "imagebind", "n_mels": 64})
    assert (clap.sample_rate, clap.n_mels, clap.hop_length) == (48000, 64, 480)
    assert (ib.sample_rate, ib.n_mels, ib.hop_length) == (16000, 64, 160)  # the explicit key wins
    assert from_dict(AudioConfig, to_dict(ib)) == ib
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(AudioConfig, {"preset": "whisper"})


def test_bad_audio_is_a_counted_bad_sample():
    dec = decoder("audio")
    with pytest.raises(BadSample) as e:
        dec.decode({"wav": b"RIFF not really a wave file"})
    assert e.value.reason == "undecodable_audio"
    with pytest.raises(BadSample) as e:
        dec.decode({"flac": _encode(np.zeros((8000, 1), np.float32), 8000, "flac")})
    assert e.value.reason == "silent_audio"
    with pytest.raises(BadSample) as e:
        dec.decode({"wav": _encode(np.zeros((0, 1), np.float32), 8000, "wav")})
    assert e.value.reason in ("empty_audio", "undecodable_audio")
