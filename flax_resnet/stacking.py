"""The stacked variables of ``ResNet(scan_blocks=True)``, to and from the unrolled tree."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from flax_resnet.validate import ConversionError

SCAN_NAME = "rest"  # the nn.scan over blocks 1..n-1 of a stage


def _is_stage(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("layer") and name[5:].isdigit()


def is_stacked(variables: Mapping[str, Any]) -> bool:
    """Whether ``variables`` is the stacked tree of ``ResNet(scan_blocks=True)``."""
    for tree in variables.values():
        if isinstance(tree, Mapping):
            for name, stage in tree.items():
                if _is_stage(name) and isinstance(stage, Mapping) and SCAN_NAME in stage:
                    return True
    return False


def _stack(arrays: list) -> Any:
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    import jax.numpy as jnp

    return jnp.stack(arrays)


def _tree_structure(tree: Any, prefix: tuple = ()) -> dict[tuple, tuple]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_tree_structure(v, (*prefix, k)))
        return out
    return {prefix: (tuple(np.shape(tree)), str(getattr(tree, "dtype", type(tree).__name__)))}


def _map_blocks(fn: Callable[[list], Any], blocks: list[Mapping]) -> Any:
    """Applies ``fn`` to the lists of corresponding leaves of identical trees."""
    first = blocks[0]
    if isinstance(first, Mapping):
        return {k: _map_blocks(fn, [b[k] for b in blocks]) for k in first}
    return fn(blocks)


def stack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The unrolled tree -> the stacked tree of ``ResNet(scan_blocks=True)``.

    In every collection, blocks ``1..n-1`` of each ``layerN`` become one
    subtree ``layerN/rest`` whose leaves carry a leading axis of length
    ``n - 1`` (block ``i`` at index ``i - 1``); block ``0`` and everything
    else are kept as they are (not copied). Exact: ``unstack_blocks`` gives
    back the same bytes.

    Raises:
        ConversionError: the tree is already stacked, a stage's block names
            are not ``0..n-1``, or its repeated blocks differ in structure,
            shape or dtype.
    """
    if is_stacked(variables):
        raise ConversionError("stacked Flax variables", other=["variables are already stacked (have a layerN/rest subtree)"])
    problems = []
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[collection] = tree
            continue
        new: dict[str, Any] = {}
        for name, stage in tree.items():
            if not (_is_stage(name) and isinstance(stage, Mapping)):
                new[name] = stage
                continue
            n = len(stage)
            if sorted(stage) != sorted(str(i) for i in range(n)):
                problems.append(f"{collection}/{name} has blocks {sorted(stage)}, expected 0..{n - 1}")
                continue
            if n < 2:
                new[name] = dict(stage)
                continue
            rest = [stage[str(i)] for i in range(1, n)]
            want = _tree_structure(rest[0])
            bad = [str(i) for i, b in enumerate(rest, start=1) if _tree_structure(b) != want]
            if bad:
                problems.append(f"{collection}/{name} blocks {', '.join(bad)} differ in structure, shape or dtype from block 1")
                continue
            new[name] = {"0": stage["0"], SCAN_NAME: _map_blocks(_stack, rest)}
        out[collection] = new
    if problems:
        raise ConversionError("stacked Flax variables", other=problems)
    return out


def unstack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The stacked tree of ``ResNet(scan_blocks=True)`` -> the unrolled tree.

    The inverse of ``stack_blocks``: ``layerN/rest`` leaves of leading size
    ``n - 1`` become blocks ``1..n-1`` (numpy leaves as views, no copy).
    An unrolled tree comes back as it is.

    Raises:
        ConversionError: a stage has names other than ``0`` and ``rest``, or
            the leading sizes of its ``rest`` leaves differ.
    """
    problems = []
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[collection] = tree
            continue
        new: dict[str, Any] = {}
        for name, stage in tree.items():
            if not (_is_stage(name) and isinstance(stage, Mapping) and SCAN_NAME in stage):
                new[name] = stage
                continue
            extra = sorted(k for k in stage if k not in ("0", SCAN_NAME))
            if extra:
                problems.append(f"{collection}/{name} mixes stacked blocks with unrolled ones ({', '.join(extra)})")
                continue
            sizes = {np.shape(a)[0] if np.ndim(a) else None for a in _tree_structure_leaves(stage[SCAN_NAME])}
            if len(sizes) != 1 or None in sizes:
                problems.append(f"{collection}/{name}/{SCAN_NAME} leaves have leading sizes {sorted(map(str, sizes))}, expected one")
                continue
            (m,) = sizes
            unrolled = {"0": stage["0"]} if "0" in stage else {}
            for i in range(m):
                unrolled[str(i + 1)] = _map_blocks(lambda a, i=i: a[0][i], [stage[SCAN_NAME]])
            new[name] = unrolled
        out[collection] = new
    if problems:
        raise ConversionError("unrolled Flax variables", other=problems)
    return out


def _tree_structure_leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _tree_structure_leaves(v)]
    return [tree]
