"""Per-pair loss weights and temperature ranges: what the objective sums and clamps, and the configs it refuses."""

from __future__ import annotations

import pytest
import torch

from tessera.config import ConfigError, from_dict
from tessera.losses import contrastive_loss_reference
from tessera.models import ModelConfig, build_model
from tessera.train.components.objectives import ContrastiveObjective
from tessera.train.recipes.config import LossConfig
from tessera.train.recipes.runs import PretrainConfig

from .conftest import TINY_MODEL


def _model_and_batch():
    model = build_model(from_dict(ModelConfig, TINY_MODEL, "model"))  # temperature 0.07: logit scale 14.3
    torch.manual_seed(0)
    return model, {"image": torch.randn(10, 3, 32, 32), "text": torch.randint(1, 400, (10, 16))}


def test_a_pair_weight_scales_its_share_of_the_total_and_names_the_pair_either_way():
    model, batch = _model_and_batch()
    plain, _ = ContrastiveObjective(model.pairs, LossConfig())(model, batch)
    weighted, _ = ContrastiveObjective(model.pairs, LossConfig(weights={"text-image": 0.25}))(model, batch)
    assert weighted["loss/image-text"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)  # logged unweighted
    assert weighted["loss"].item() == pytest.approx(0.25 * plain["loss"].item(), rel=1e-6)


def test_a_temperature_range_clamps_the_pairs_logit_scale_in_the_loss():
    model, batch = _model_and_batch()
    cfg = LossConfig(temperature_range={"image-text": (0.1, 0.5)})  # 0.07 is below the floor: scale 1/0.1
    losses, report = ContrastiveObjective(model.pairs, cfg)(model, batch)
    assert report["temperature/image-text"].item() == pytest.approx(0.1, rel=1e-6)
    out = model(batch)
    want = contrastive_loss_reference(out["features"]["image"], out["features"]["text"], torch.tensor(10.0))
    assert losses["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    losses["loss"].backward()
    assert model.logit_scales["image__text"].grad.abs().max() == 0  # clamped, as at model.max_logit_scale
    # inside the range the temperature trains as usual
    model.zero_grad()
    wide = LossConfig(temperature_range={"image-text": (0.01, 0.5)})
    ContrastiveObjective(model.pairs, wide)(model, batch)[0]["loss"].backward()
    assert model.logit_scales["image__text"].grad.abs().max() > 0


@pytest.mark.parametrize(
    "loss,message",
    [
        ({"weights": {"image-audio": 1.0}}, "loss.weights.image-audio: the model aligns no such pair; its pairs are"),
        ({"weights": {"image-text": -1.0}}, "loss.weights.image-text must be >= 0"),
        ({"temperature_range": {"text-image": [0.2, 0.1]}}, "needs 0 < floor < cap"),
        ({"temperature_range": {"text-video": [0.01, 0.1]}}, "loss.temperature_range.text-video: the model aligns no"),
    ],
)
def test_bad_pair_options_say_what_is_wrong(loss, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PretrainConfig, {"model": TINY_MODEL, "loss": loss}, "")
