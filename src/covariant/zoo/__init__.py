"""Ready-made problems, models, data and training loops to try covariant on.

- :mod:`covariant.zoo.problems`: the 2-D reference problem of docs/math.md §8 (loss, chart, point);
- :mod:`covariant.zoo.architectures`: MLP / CNN1D / ResNet1D for 1-D inputs, the registry
  and presets;
- :mod:`covariant.zoo.vision`: a CIFAR-style ResNet with batch norm and a small ViT;
- :mod:`covariant.zoo.checkpoints`: save and load those models with their recipe;
- :mod:`covariant.zoo.data`: MNIST-1D (generated locally), sklearn digits, synthetic sets
  (CIFAR-shaped images included);
- :mod:`covariant.zoo.training`: a seeded cross-entropy training loop and evaluation.

Example
-------
>>> from covariant import zoo
>>> zoo.architectures.num_parameters(zoo.architectures.preset("mlp-small"))
2698
"""

from __future__ import annotations

from . import architectures, checkpoints, data, problems, training, vision

__all__ = ["architectures", "checkpoints", "data", "problems", "training", "vision"]
