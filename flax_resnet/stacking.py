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
    return _map_stages(variables, lambda stage: True, _stack_stage, "stacked Flax variables")


def _stack_stage(where: str, stage: Mapping) -> dict | str:
    n = len(stage)
    if sorted(stage) != sorted(str(i) for i in range(n)):
        return f"{where} has blocks {sorted(stage)}, expected 0..{n - 1}"
    if n < 2:
        return dict(stage)
    rest = [stage[str(i)] for i in range(1, n)]
    want = _tree_structure(rest[0])
    bad = [str(i) for i, b in enumerate(rest, start=1) if _tree_structure(b) != want]
    if bad:
        return f"{where} blocks {', '.join(bad)} differ in structure, shape or dtype from block 1"
    return {"0": stage["0"], SCAN_NAME: _map_blocks(_stack, rest)}


def unstack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The stacked tree of ``ResNet(scan_blocks=True)`` -> the unrolled tree.

    The inverse of ``stack_blocks``: ``layerN/rest`` leaves of leading size
    ``n - 1`` become blocks ``1..n-1`` (numpy leaves as views, no copy).
    An unrolled tree comes back as it is.

    Raises:
        ConversionError: a stage has names other than ``0`` and ``rest``, or
            the leading sizes of its ``rest`` leaves differ.
    """
    return _map_stages(variables, lambda stage: SCAN_NAME in stage, _unstack_stage, "unrolled Flax variables")


def _unstack_stage(where: str, stage: Mapping) -> dict | str:
    extra = sorted(k for k in stage if k not in ("0", SCAN_NAME))
    if extra:
        return f"{where} mixes stacked blocks with unrolled ones ({', '.join(extra)})"
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in _tree_structure_leaves(stage[SCAN_NAME])}
    if len(sizes) != 1 or None in sizes:
        return f"{where}/{SCAN_NAME} leaves have leading sizes {sorted(map(str, sizes))}, expected one"
    (m,) = sizes
    unrolled = {"0": stage["0"]} if "0" in stage else {}
    for i in range(m):
        unrolled[str(i + 1)] = _map_blocks(lambda a, i=i: a[0][i], [stage[SCAN_NAME]])
    return unrolled


def _map_stages(variables: Mapping[str, Any], select: Callable[[Mapping], bool], convert: Callable[[str, Mapping], Any], what: str) -> dict[str, Any]:
    """``variables`` with ``convert("collection/layerN", stage)`` for every stage ``select`` picks; the rest kept as it is (not copied).

    ``convert`` returns the new stage, or a problem (a string); every
    problem of every stage is raised at once.

    Raises:
        ConversionError: ``convert`` found problems (``what`` is the expected kind of tree).
    """
    problems = []
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[collection] = tree
            continue
        new: dict[str, Any] = {}
        for name, stage in tree.items():
            if not (_is_stage(name) and isinstance(stage, Mapping) and select(stage)):
                new[name] = stage
                continue
            converted = convert(f"{collection}/{name}", stage)
            if isinstance(converted, str):
                problems.append(converted)
            else:
                new[name] = converted
        out[collection] = new
    if problems:
        raise ConversionError(what, other=problems)
    return out


def _tree_structure_leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _tree_structure_leaves(v)]
    return [tree]
