"""The study's five models.

* ``lenet5`` — exactly the study's LeNet5 (MNIST, 28x28x1): Conv 6@5x5 valid
  ReLU, MaxPool 3x3 stride 3, Conv 16@3x3 valid ReLU, MaxPool 2x2, Flatten,
  Dense 120 ReLU, Dense 84 ReLU, Dense 10.
* ``facenet`` — a compact 11-layer CNN for UTKFace gender (2 classes) on
  64x64x3 faces (the study's Keras FaceNet has 11 layers; its exact
  architecture is not published, so this is our own of that size):
  Conv 32@3x3 same ReLU, MaxPool 2, Conv 64@3x3 same ReLU, MaxPool 2,
  Conv 128@3x3 same ReLU, MaxPool 2, Flatten, Dense 128 ReLU, Dropout 0.5,
  Dense 64 ReLU, Dense 2. (Keras counts 11 layers: 3 conv, 3 pool, flatten,
  3 dense, dropout.)
* ``vgg16`` — CIFAR VGG16 with BatchNorm (32x32x3): 13 x (Conv 3x3 same, BN,
  ReLU) in blocks 64-64 / 128-128 / 256x3 / 512x3 / 512x3, each block closed
  by MaxPool 2; Flatten, Dense 512, BN, ReLU, Dropout 0.5, Dense 10.
* ``resnet18`` — CIFAR ResNet18 (He et al. 2016; 3x3 stem, no stem pooling),
  basic blocks [2, 2, 2, 2] with widths 64/128/256/512, BN, global average
  pooling, Dense 10.
* ``densenet121`` — DenseNet121 (Huang et al. 2017) for 224x224x3 ImageNet,
  growth 32, blocks (6, 12, 24, 16), bottleneck 4x, compression 0.5, 1000
  classes.

All are sequential (a tuple of :class:`~dlfix_jax.models.layers.LayerSpec`)
except ResNet18 and DenseNet121, whose layers are named by module path
(``stage2/block0/conv1``...).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from dlfix_jax import registry
from dlfix_jax.models import base
from dlfix_jax.models import layers as layers_lib
from dlfix_jax.models.layers import spec

MODELS: registry.Registry[Callable[..., base.Model]] = registry.Registry(
    "model")
register = MODELS.register


def get(name: str, **kwargs) -> base.Model:
    """Builds the registered model ``name`` (kwargs: num_classes, input_shape)."""
    return MODELS.get(name)(**kwargs)


def names() -> list[str]:
    return MODELS.names()


def sequential(name: str, layers, input_shape, num_classes,
               output_softmax=False) -> base.Model:
    layers = tuple(layers)
    layers_lib.check_unique_names(layers)
    return base.Model(name=name, module=layers_lib.Sequential(layers),
                      input_shape=tuple(input_shape), num_classes=num_classes,
                      layers=layers, output_softmax=output_softmax)


@register("lenet5")
def lenet5(num_classes: int = 10, input_shape=(28, 28, 1)) -> base.Model:
    layers = [
        spec("conv", "conv1", features=6, kernel=(5, 5)),
        spec("relu", "relu1"),
        spec("maxpool", "pool1", window=(3, 3), strides=(3, 3)),
        spec("conv", "conv2", features=16, kernel=(3, 3)),
        spec("relu", "relu2"),
        spec("maxpool", "pool2", window=(2, 2)),
        spec("flatten", "flatten"),
        spec("dense", "dense1", features=120),
        spec("relu", "relu3"),
        spec("dense", "dense2", features=84),
        spec("relu", "relu4"),
        spec("dense", "dense3", features=num_classes),
    ]
    return sequential("lenet5", layers, input_shape, num_classes)


@register("facenet")
def facenet(num_classes: int = 2, input_shape=(64, 64, 3)) -> base.Model:
    layers = []
    for i, f in enumerate((32, 64, 128), start=1):
        layers += [spec("conv", f"conv{i}", features=f, kernel=(3, 3),
                        padding="SAME"),
                   spec("relu", f"relu{i}"),
                   spec("maxpool", f"pool{i}", window=(2, 2))]
    layers += [
        spec("flatten", "flatten"),
        spec("dense", "dense1", features=128), spec("relu", "relu4"),
        spec("dropout", "dropout", rate=0.5),
        spec("dense", "dense2", features=64), spec("relu", "relu5"),
        spec("dense", "dense3", features=num_classes),
    ]
    return sequential("facenet", layers, input_shape, num_classes)


_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                 (512, 512, 512))


@register("vgg16")
def vgg16(num_classes: int = 10, input_shape=(32, 32, 3)) -> base.Model:
    layers, i = [], 0
    for b, block in enumerate(_VGG16_BLOCKS, start=1):
        for f in block:
            i += 1
            layers += [spec("conv", f"conv{i}", features=f, kernel=(3, 3),
                            padding="SAME"),
                       spec("bn", f"bn{i}"), spec("relu", f"relu{i}")]
        layers.append(spec("maxpool", f"pool{b}", window=(2, 2)))
    layers += [
        spec("flatten", "flatten"),
        spec("dense", "dense1", features=512), spec("bn", "bn_dense1"),
        spec("relu", "relu_dense1"), spec("dropout", "dropout", rate=0.5),
        spec("dense", "dense2", features=num_classes),
    ]
    return sequential("vgg16", layers, input_shape, num_classes)


class _Bn(nn.Module):
    """BatchNorm with Keras-like defaults, switched by ``train``."""

    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(
            x, use_running_average=not train)


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)),
                    use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(momentum=0.9, epsilon=1e-5, name="bn1")(
            y, use_running_average=not train))
        y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                    use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(momentum=0.9, epsilon=1e-5, name="bn2")(
            y, use_running_average=not train)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), s, use_bias=False,
                        name="shortcut_conv")(x)
            x = nn.BatchNorm(momentum=0.9, epsilon=1e-5, name="shortcut_bn")(
                x, use_running_average=not train)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(momentum=0.9, epsilon=1e-5, name="stem_bn")(
            x, use_running_average=not train))
        for i, f in enumerate((64, 128, 256, 512), start=1):
            for j in range(2):
                x = BasicBlock(f, 2 if (j == 0 and i > 1) else 1,
                               name=f"stage{i}_block{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="dense")(x)


@register("resnet18")
def resnet18(num_classes: int = 10, input_shape=(32, 32, 3)) -> base.Model:
    return base.Model("resnet18", ResNet18(num_classes), tuple(input_shape),
                      num_classes)


class DenseLayer(nn.Module):
    growth: int = 32
    bn_size: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.BatchNorm(momentum=0.9, epsilon=1.001e-5, name="bn1")(
            x, use_running_average=not train)
        y = nn.Conv(self.bn_size * self.growth, (1, 1), use_bias=False,
                    name="conv1")(nn.relu(y))
        y = nn.BatchNorm(momentum=0.9, epsilon=1.001e-5, name="bn2")(
            y, use_running_average=not train)
        y = nn.Conv(self.growth, (3, 3), padding="SAME", use_bias=False,
                    name="conv2")(nn.relu(y))
        return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
    blocks: tuple[int, ...] = (6, 12, 24, 16)
    growth: int = 32
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                    use_bias=False, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(momentum=0.9, epsilon=1.001e-5,
                                 name="stem_bn")(x, use_running_average=not train))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for b, n in enumerate(self.blocks, start=1):
            for i in range(n):
                x = DenseLayer(self.growth, name=f"block{b}_layer{i}")(x, train)
            if b < len(self.blocks):
                x = nn.BatchNorm(momentum=0.9, epsilon=1.001e-5,
                                 name=f"transition{b}_bn")(
                    x, use_running_average=not train)
                x = nn.Conv(x.shape[-1] // 2, (1, 1), use_bias=False,
                            name=f"transition{b}_conv")(nn.relu(x))
                x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.BatchNorm(momentum=0.9, epsilon=1.001e-5,
                                 name="final_bn")(x, use_running_average=not train))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="dense")(x)


@register("densenet121")
def densenet121(num_classes: int = 1000, input_shape=(224, 224, 3)
                ) -> base.Model:
    return base.Model("densenet121", DenseNet(num_classes=num_classes),
                      tuple(input_shape), num_classes)
