"""``convert`` (a file to another format) and ``inspect`` (a report that refuses nothing)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flax_resnet.convert import ConversionError, infer_config, infer_flax_config, nonfinite
from flax_resnet.io.atomic import check_output
from flax_resnet.io.common import as_dtype, deferred_interrupts, one_line, path_bytes, tree_size
from flax_resnet.io.formats import read
from flax_resnet.io.resolve import OUTPUT_LAYOUTS, resolve, write_resolved
from flax_resnet.io.sniff import FORMATS, check_input, format_for_path


def _dtype_counts(arrays: Mapping[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in arrays.values():
        name = np.asarray(a).dtype.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    arch: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    format: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """Converts a checkpoint file to another format; see ``flax-resnet convert``.

    Returns:
        A report: ``src``, ``src_format``, ``src_keys``, ``src_layout``,
        ``dst``, ``format``, ``keys``, ``arch``, ``layout``,
        ``num_classes``, ``num_params`` and ``num_stats`` (of the output),
        ``dtype``, ``bytes``, ``seconds``, ``wrapper``, ``extras``, ``prefix``.
    """
    t0 = time.perf_counter()
    fmt = format or format_for_path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_input(src)
    check_output(dst, fmt, force)
    dt = as_dtype(dtype)
    if layout is not None and layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}")
    with deferred_interrupts():
        ck = read(src)
        r = resolve(ck, arch, None, allow_nonfinite)
        kept = {k: ck.meta[k] for k in ("labels", "stride_in_1x1", "source") if k in ck.meta}  # a model directory's config
        out = write_resolved(Path(dst), fmt, r, layout, force, {"source_format": ck.format, **kept}, dt)
    out.update(
        src=str(src),
        src_format=ck.format,
        src_keys=ck.keys,
        src_layout=r.config.layout,
        dst=out.pop("path"),
        wrapper=ck.wrapper,
        extras=ck.extras,
        prefix=ck.prefix,
        seconds=time.perf_counter() - t0,
    )
    return out


def inspect(path: str | os.PathLike) -> dict:
    """A report on a checkpoint, without refusing on problems.

    Returns:
        A dict: ``path``, ``format``, ``keys``, ``bytes``, ``wrapper``,
        ``extras``, ``prefix``, ``num_tensors``, ``dtypes`` (dtype: count),
        ``arch``, ``layout``, ``num_classes``, ``in_channels``,
        ``num_params``, ``num_stats``, ``num_batches_tracked``,
        ``nonfinite`` (key, NaN count, Inf count, size), ``missing``,
        ``unexpected``, ``mismatched``, ``problems`` (one line each) and
        ``meta``. ``ok`` is True when ``convert`` would accept the file.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError: not a readable checkpoint.
    """
    with deferred_interrupts():
        ck = read(path)
        p = Path(path)
        tensors = ck.flat()
        report: dict[str, Any] = {
            "path": str(p),
            "format": ck.format,
            "keys": ck.keys,
            "bytes": path_bytes(p),
            "wrapper": ck.wrapper,
            "extras": list(ck.extras),
            "prefix": ck.prefix,
            "num_tensors": len(tensors),
            "dtypes": _dtype_counts(tensors),
            "arch": None,
            "layout": None,
            "num_classes": None,
            "in_channels": None,
            "num_params": None,
            "num_stats": None,
            "num_batches_tracked": None,
            "nonfinite": [list(b) for b in nonfinite(tensors)],
            "missing": [],
            "unexpected": [],
            "mismatched": [],
            "problems": [],
            "meta": ck.meta,
        }
        try:
            r = resolve(ck, allow_nonfinite=True)
        except ConversionError as e:
            report.update(missing=e.missing, unexpected=e.unexpected, mismatched=[[k, list(a), list(b)] for k, a, b in e.mismatched])
            report["problems"].append(one_line(e, 400))
            try:  # what the keys say, even if they do not all fit
                cfg = infer_config(ck.tensors) if ck.keys == "torch" else infer_flax_config(ck.tensors)[0]
                report.update(arch=cfg.arch, layout=cfg.layout, num_classes=cfg.num_classes, in_channels=cfg.in_channels)
            except (ConversionError, ValueError, TypeError, KeyError):
                pass
        else:
            cfg = r.config
            report.update(
                arch=cfg.arch,
                layout=cfg.layout,
                num_classes=cfg.num_classes,
                in_channels=cfg.in_channels,
                num_params=tree_size(r.variables["params"]),
                num_stats=tree_size(r.variables.get("batch_stats", {})),
                num_batches_tracked=r.num_batches_tracked,
            )
    if report["nonfinite"]:
        key, n_nan, n_inf, _ = report["nonfinite"][0]
        more = f" and {len(report['nonfinite']) - 1} more tensor(s)" if len(report["nonfinite"]) > 1 else ""
        report["problems"].append(f"non-finite values in {key} ({n_nan} NaN, {n_inf} Inf){more}")
    report["ok"] = not report["problems"]
    return report
