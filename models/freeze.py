"""What every adapter does to its base: keep it as it was. Batch-norm statistics stay fixed while an adapter trains,
and parameter counts say how much of a model trains."""

from __future__ import annotations

from torch import nn

from tessera.config import ConfigError


class _FrozenStatistics:
    """Mixin: a batch-norm layer that stays in eval mode, i.e. normalises with its running statistics and never
    updates them, whatever `.train()` asks. An adapter must leave its base as it was, buffers included."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenStatsBatchNorm1d(_FrozenStatistics, nn.BatchNorm1d):
    pass


class FrozenStatsBatchNorm2d(_FrozenStatistics, nn.BatchNorm2d):
    pass


class FrozenStatsBatchNorm3d(_FrozenStatistics, nn.BatchNorm3d):
    pass


_FROZEN_STATS = {
    nn.BatchNorm1d: FrozenStatsBatchNorm1d,
    nn.BatchNorm2d: FrozenStatsBatchNorm2d,
    nn.BatchNorm3d: FrozenStatsBatchNorm3d,
}


def freeze_norm_statistics(model: nn.Module) -> int:
    """Keep every batch-norm layer of `model` in eval mode from now on (same parameters, buffers and state-dict
    keys; only `.train()` changes). Without this, training an adapter on a ModifiedResNet or GNN tower would
    move the frozen base's running statistics toward the few fine-tuning batches. Returns the layers frozen."""
    count = 0
    for module in model.modules():
        frozen = _FROZEN_STATS.get(type(module))
        if frozen is not None:
            module.__class__ = frozen
            module.train(False)
            count += 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _FrozenStatistics):
            raise ConfigError(
                f"cannot freeze the statistics of {type(module).__name__}: adapters support BatchNorm1d/2d/3d"
            )
    return count


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameter counts."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
