"""Training data from your own images: image folders and Hugging Face datasets, streamed with grain.

* ``sources``: ``open_splits(path)`` opens an image folder (torchvision's
  ``ImageFolder`` layout) or a ``datasets`` directory as train/val splits,
  checking every file's header first (needs Pillow; ``datasets`` for its
  directories).
* ``pipeline``: ``make_loader`` builds the grain ``DataLoader`` of one epoch
  (decode, RandomResizedCrop + flip, normalize, batch), seeded per record,
  with checkpointable iterator state and per-host sharding (needs grain).
* ``stream``: ``ImageData`` and ``ArrayData``, the one interface the
  ``train`` command feeds on (image folders and datasets directories through
  grain; ``.npz`` files and digits in memory).

Nothing here imports grain, Pillow or ``datasets`` until used.
"""
