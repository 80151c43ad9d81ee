"""The benchmark tables, one ``section_*`` per ``--sections`` name: each runs its measurements and renders Markdown."""

from __future__ import annotations

from benchmarks.common import IMAGE
from benchmarks.driver import Runner, _fmt, _loaded, _variant
from flax_resnet.tables import markdown_table


def _speed_rows(r: Runner, args, section: str, batches: list[int]) -> list[list[str]]:
    rows = []
    for arch in args.archs:
        for dtype in args.dtypes:
            for batch in batches:
                row = dict(arch=arch, dtype=dtype, batch=batch)
                if section == "train":
                    rep, budget = args.train_repeats, args.train_budget
                else:
                    rep, budget = (args.repeats, args.budget) if batch > 1 else (max(args.repeats, 10), None)
                base = dict(arch=arch, dtype=dtype, batch=batch, repeats=rep, budget_s=budget)
                other = "fast" if section == "eval" else "plain"
                fl = r.run(section, row, "flax", dict(base, kind=f"flax_{section}", variants=["jit", other], chunk=args.chunk, xla_opts=args.xla_opts))
                torch_on = dtype in args.torch_dtypes
                to = r.run(section, row, "torch", dict(base, kind=f"torch_{section}", variants=["nchw", "cl"])) if torch_on else {}
                tc = None
                if torch_on and arch in args.compile_archs and batch > 1 and (section == "eval" or (args.train_compile and dtype == "fp32")):
                    tc = r.run(section, row, "torch_compile", dict(base, kind=f"torch_{section}", variants=["compile"]), timeout=1800)
                speed = lambda res, k: (_variant(res, k) or {}).get("img_s")
                f, fa = speed(fl, "jit"), speed(fl, other)
                nchw, cl, comp = speed(to, "nchw"), speed(to, "cl"), speed(tc, "compile")
                best = max([v for v in (nchw, cl) if v], default=None)
                ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
                err = "; ".join(x.get("error", "") for x in (fl, to, tc) if x and not x.get("ok"))
                flag = " *" if _loaded([fl, to, tc]) else ""
                digits = 1 if section == "eval" else 2
                rss = f"{_fmt(fl.get('peak_rss_mib'), 0)}/{_fmt(to.get('peak_rss_mib'), 0)}" + (f"/{_fmt(tc.get('peak_rss_mib'), 0)}" if tc else "")
                rows.append(
                    [arch, dtype, str(batch), _fmt(f, digits), _fmt(fa, digits), _fmt(nchw, digits), _fmt(cl, digits), _fmt(comp, digits), ratio(f, best), ratio(fa, best), ratio(fa, comp), rss + flag]
                    + ([err] if err else [])
                )
    return rows


SPEED_HEAD = ["arch", "dtype", "batch", "Flax jit", "Flax fast", "torch NCHW", "torch CL", "torch.compile", "Flax/torch", "fast/torch", "fast/compile", "RSS MiB Flax/torch/compile"]
# Train: the second Flax column is the escape hatch (every conv a plain XLA conv), for comparison with the default.
TRAIN_HEAD = [h.replace("Flax fast", "Flax plain XLA").replace("fast/", "plain/") for h in SPEED_HEAD]


def section_eval(r: Runner, args) -> str:
    rows = _speed_rows(r, args, "eval", args.batches)
    note = (
        f"Flax jit = `jax.jit(model.apply)` of the default model. Flax fast = `inference.fold` (BN folded into the convs) "
        f"run by `inference.predict_fn(chunk={args.chunk})`. torch.compile runs channels_last. "
        "Ratios are against torch's best eager layout (and torch.compile). RSS: Flax process (both variants) / torch eager process (both layouts) / torch.compile process."
    )
    return "### Eval forward (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(SPEED_HEAD, [r_[: len(SPEED_HEAD)] for r_ in rows]) + _errors(rows)


def section_train(r: Runner, args) -> str:
    rows = _speed_rows(r, args, "train", args.train_batches)
    note = (
        "One step = forward in train mode (batch statistics), cross-entropy, backward, SGD momentum update, BN running stats. "
        "Flax: the library's `training.train_step_fn` under `jax.jit` with the state donated (Flax jit: the default model, on CPU "
        "with `flax_resnet.kernels`' CPU forms; Flax plain XLA: traced under `kernels.use_plain()`). torch: eager (and torch.compile of the model)."
    )
    return "### Train step (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(TRAIN_HEAD, [r_[: len(TRAIN_HEAD)] for r_ in rows]) + _errors(rows)


def _errors(rows) -> str:
    errs = [f"- {r_[0]} {r_[1]} batch {r_[2]}: {r_[-1]}" for r_ in rows if len(r_) > len(SPEED_HEAD)]
    return ("\n\nErrors:\n" + "\n".join(errs)) if errs else ""


def section_compile(r: Runner, args) -> str:
    head = ["arch", "step", "unrolled s", "scan s", "scan/unrolled", "scan+remat s", "scan+remat/unrolled", "first call unrolled/scan/scan+remat s", "RSS MiB unrolled/scan/scan+remat"]
    rows = []
    for arch in args.compile_depths:
        for mode in args.compile_modes:
            row = dict(arch=arch, mode=mode)
            res = {}
            for variant in ("unrolled", "scan") + (("scan_remat",) if mode == "train" else ()):
                res[variant] = r.run("compile", row, variant, dict(kind="compile", arch=arch, mode=mode, variant=variant, batch=args.compile_batch, xla_opts=args.xla_opts))
            tot = {k: (v["lower_s"] + v["compile_s"]) if v.get("ok") else None for k, v in res.items()}
            first = {k: v.get("first_call_s") if v.get("ok") else None for k, v in res.items()}
            ratio = lambda k: f"{tot[k] / tot['unrolled']:.2f}" if tot.get(k) and tot["unrolled"] else "-"
            flag = " *" if _loaded(res.values()) else ""
            rss = "/".join(_fmt(v.get("peak_rss_mib"), 0) for v in res.values())
            rows.append(
                [arch, mode, _fmt(tot["unrolled"], 2), _fmt(tot["scan"], 2), ratio("scan"), _fmt(tot.get("scan_remat"), 2), ratio("scan_remat"), "/".join(_fmt(v, 1) for v in first.values()), rss + flag]
            )
    return (
        f"### Compile time (batch {args.compile_batch}, {IMAGE}x{IMAGE}, fp32; `jax.jit(...).lower()` + `.compile()`; first call = lower + compile + first run)\n\n"
        "eval = `model.apply`; train = loss, gradients and an SGD update. scan = `ResNet(scan_blocks=True)`, + remat = `remat=True`.\n\n"
        + markdown_table(head, rows)
    )


def section_construct(r: Runner, args) -> str:
    rows = []
    for arch in args.construct_archs:
        res = r.run("construct", dict(arch=arch), "construct", dict(kind="construct", arch=arch, repeats=args.construct_repeats, jit_init=args.jit_init))
        if not res.get("ok"):
            rows.append([arch, res.get("error", "failed")] + ["-"] * 9)
            continue
        mib = res["bytes"] / 2**20
        flag = " *" if _loaded([res]) else ""
        rows.append(
            [
                arch,
                f"{mib:.0f}",
                _fmt(res["memcpy_s"] * 1e3, 0),
                _fmt(res["torch_to_flax_s"] * 1e3, 0),
                f"{res['torch_to_flax_s'] / res['memcpy_s']:.2f}",
                _fmt(res["torch_to_flax_scan_s"] * 1e3, 0),
                _fmt(res["flax_to_torch_s"] * 1e3, 0),
                _fmt(res["ready_s"], 2) + f" (first {res['ready_first_s']:.2f})",
                _fmt(res["ready_scan_s"], 2),
                _fmt(res.get("jit_init_s"), 1),
                _fmt(res.get("peak_rss_mib"), 0) + flag,
            ]
        )
    head = ["arch", "MiB", "np.copy ms", "torch_to_flax ms", "convert/copy", "…scan_blocks ms", "flax_to_torch ms", "ready to run s", "ready (scan) s", "jit(init) s", "RSS MiB"]
    return (
        "### Construction and conversion (fp32 weights; ready to run = from_torch + eval_shape check + device_put)\n\n" + markdown_table(head, rows)
    )


def section_nnx(r: Runner, args) -> str:
    """Flax NNX against Linen, one process per row (ResNet-50 fp32): eval forward and train step."""
    head = ["mode", "arch", "batch", "Linen jit", "NNX nnx.jit", "NNX cached_partial", "NNX split + jax.jit", "best NNX/Linen", "compile s Linen/nnx.jit"]
    rows = []
    for mode, batches in (("eval", [b for b in args.batches if b > 1] or args.batches), ("train", args.train_batches)):
        for arch in args.nnx_archs:
            for batch in batches:
                rep, budget = (args.train_repeats, args.train_budget) if mode == "train" else (args.repeats, args.budget)
                task = dict(kind="nnx", mode=mode, arch=arch, batch=batch, repeats=rep, budget_s=budget)
                res = r.run("nnx", dict(mode=mode, arch=arch, batch=batch), "nnx", task, timeout=1800 if mode == "train" else 900)  # four train compiles
                v = {k: (_variant(res, k) or {}) for k in ("linen", "nnx_jit", "nnx_cached", "nnx_split")}
                speed = {k: x.get("img_s") for k, x in v.items()}
                best = max([speed[k] for k in ("nnx_jit", "nnx_cached", "nnx_split") if speed[k]], default=None)
                ratio = f"{best / speed['linen']:.2f}" if best and speed["linen"] else "-"
                comp = f"{_fmt(v['linen'].get('compile_s'))}/{_fmt(v['nnx_jit'].get('compile_s'))}"
                flag = " *" if _loaded([res]) else ""
                digits = 1 if mode == "eval" else 2
                rows.append([mode, arch, str(batch)] + [_fmt(speed[k], digits) for k in v] + [ratio + flag, comp] + ([res.get("error", "")] if not res.get("ok") else []))
    note = (
        "The same weights and batch in one process, variants timed in turns. Linen jit: the eval/train rows' code (`inference.predict_fn`; "
        "`training.train_step_fn` under jit, state donated). NNX nnx.jit: `nnx.jit(lambda m, x: m(x))` / `flax_resnet.nnx.training.train_step`, "
        "which walks the model (and optimizer) graph on every call; cached_partial: the same under `nnx.cached_partial` (the walk cached); "
        "split + jax.jit: `nnx.split` once, then `jax.jit` of a pure function of the state (`nnx.merge` inside; train: donated). "
        "compile s: first call (compile included) of Linen and of nnx.jit."
    )
    errs = [f"- {r_[0]} {r_[1]} batch {r_[2]}: {r_[-1]}" for r_ in rows if len(r_) > len(head)]
    return "### Flax NNX vs Linen (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(head, [r_[: len(head)] for r_ in rows]) + (("\n\nErrors:\n" + "\n".join(errs)) if errs else "")
