"""grain operations of the pipeline (module level so worker processes can unpickle them); needs grain."""

from __future__ import annotations

import grain
import numpy as np

from flax_resnet import preprocess as pp
from flax_resnet.imagedata.transforms import AUGMENTS, RATIO, BadImage, Recipe, _bad, _normalize, decode, rrc_box


class TrainTransform(grain.transforms.RandomMap):
    """decode -> RandomResizedCrop + flip (or the eval resize/crop for ``none``) -> normalize."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def random_map(self, record, rng: np.random.Generator):
        payload, label = record
        r = self.recipe
        try:
            img = decode(payload)
        except BadImage as e:
            return _bad(e, r)
        scale = AUGMENTS[r.augment]
        if scale is None:
            return pp.apply(np.asarray(img), r.eval_pp).astype(np.float32), np.int32(label)
        top, left, h, w = rrc_box(img.height, img.width, scale, RATIO, rng)
        img = img.resize((r.size, r.size), 2, box=(left, top, left + w, top + h))  # bilinear, as torchvision on PIL
        a = np.asarray(img)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        return _normalize(a, r), np.int32(label)

class EvalTransform(grain.transforms.Map):
    """decode -> the weights' resize and center crop -> normalize (``preprocess.apply``)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def map(self, record):
        payload, label = record
        try:
            img = decode(payload)
        except BadImage as e:
            return _bad(e, self.recipe)
        return pp.apply(np.asarray(img), self.recipe.eval_pp).astype(np.float32), np.int32(label)
