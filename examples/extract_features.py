"""Extract backbone features from converted weights and fit a linear classifier on them.

``model.apply(variables, x, method="features")`` returns the stem, layer1..4
feature maps and the pooled ``pre_logits`` (NHWC), as a timm
``features_only`` model or torchvision's ``IntermediateLayerGetter`` would.
Here the pooled features of scikit-learn's digits feed a logistic regression.

    python examples/extract_features.py                       # resnet18, stand-in weights
    python examples/extract_features.py --weights resnet50-11ad3fa6.pth

Expected output (CPU, about 30 s; resnet18 from random stand-in weights, 32x32 digits):

    stem (128, 8, 8, 64)  layer1 (128, 8, 8, 64)  layer2 (128, 4, 4, 128)  layer3 (128, 2, 2, 256)  layer4 (128, 1, 1, 512)  pre_logits (128, 512)
    pooled features: train (1437, 512), test (360, 512)
    logistic regression on the features: test accuracy 0.97
"""

# example-test: --size 16 --limit 128

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

import flax_resnet
from flax_resnet import data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a torch or Flax checkpoint (default: torch_ref stand-in weights saved as ARCH.pth)")
    p.add_argument("--arch", default="resnet18", help="architecture of the stand-in weights")
    p.add_argument("--size", type=int, default=32, help="digits are upscaled from 8x8 to this size")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (a quick try)")
    args = p.parse_args(argv)

    weights = args.weights
    if weights is None:  # stands in for torchvision's download: the same keys and shapes, random values
        import torch

        import torch_ref

        weights = f"{args.arch}.pth"
        if not os.path.exists(weights):
            torch.manual_seed(0)
            torch.save(getattr(torch_ref, args.arch)(layout="torchvision").state_dict(), weights)

    model, variables = flax_resnet.load(weights)
    ds = data.load_digits(size=args.size, channels=3, normalize="imagenet")
    features = jax.jit(lambda x: model.apply(variables, x, method="features"))  # eval mode: BN running statistics

    maps = features(ds.train_images[:128])
    print("  ".join(f"{k} {tuple(maps[k].shape)}" for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")))

    def pooled(images, batch=128):
        """``pre_logits`` of every image, in batches of one shape (the last one padded): one compilation."""
        out = []
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            padded = np.concatenate([x, np.zeros((batch - len(x),) + x.shape[1:], x.dtype)])
            out.append(np.asarray(features(padded)["pre_logits"])[: len(x)])
        return np.concatenate(out)

    train_x, train_y = ds.train_images[: args.limit], ds.train_labels[: args.limit]
    f_train, f_test = pooled(train_x), pooled(ds.test_images)
    print(f"pooled features: train {f_train.shape}, test {f_test.shape}")

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(f_train), train_y)
    print(f"logistic regression on the features: test accuracy {clf.score(scaler.transform(f_test), ds.test_labels):.2f}")


if __name__ == "__main__":
    main()
