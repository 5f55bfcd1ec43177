"""Benchmark results: one JSON per GPU merged suite by suite, a markdown report, PNG plots.

``<out>/<gpu-slug>.json``::

    {"schema": 1, "gpu": ..., "torch": ..., "cuda": ..., "triton": ..., "commit": ..., "date": ...,
     "roofline": {"copy_tbps": ..., "matmul_bf16_tflops": ...},      # of the latest run
     "suites": {"attention": {"env": {...}, "roofline": {...}, "quick": false,
                              "status": "complete", "rows": [...], "notes": [...]}, ...}}

A run replaces only the suites it ran, so a partial run keeps every other suite's results (each
suite keeps the environment and roofline of its own run). When ``<out>`` has no file for this GPU
yet, the committed ``bench/results/<gpu-slug>.json`` is the starting point. The markdown report
and the plots are regenerated from the merged JSON.
"""

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
SCHEMA = 1

# Row keys that are not shape parameters (ratio_to_<anchor> keys aside).
_RESULT_KEYS = {"op", "provider", "ms", "tflops", "tbps", "frac_of_roofline", "error", "check",
                "rel_err"}
_ENV_LINE_KEYS = ("date", "commit", "source_digest", "torch", "cuda", "triton")


def suite_result(env: Mapping, ctx, status: str) -> dict:
    """The JSON entry of one suite run (``ctx`` is a ``bench.harness.Context``)."""
    return {"env": dict(env), "roofline": ctx.roofline, "quick": ctx.quick, "status": status,
            "rows": ctx.rows, "notes": ctx.notes}


def load_results(out_dir: Path, slug: str) -> dict:
    """The results to merge into: ``<out>/<slug>.json``, else the committed one, else empty.
    A file that does not parse is set aside as ``.unreadable`` rather than lost or fatal."""
    for path in (Path(out_dir) / f"{slug}.json", DEFAULT_OUT / f"{slug}.json"):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            print(f"  note: {path} does not parse ({exc}); starting from an empty file and "
                  f"keeping it as {path.name}.unreadable", flush=True)
            os.replace(path, path.with_name(path.name + ".unreadable"))
            continue
        if data.get("schema") == SCHEMA:
            return data
    return {"schema": SCHEMA, "suites": {}}


def merge_suite(data: Mapping, env: Mapping, name: str, result: Mapping) -> dict:
    """``data`` with suite ``name`` replaced by ``result`` and the top level set to ``env``."""
    merged = {**data, **env, "schema": SCHEMA}
    merged["suites"] = {**data.get("suites", {}), name: dict(result)}
    if result.get("roofline"):
        merged["roofline"] = result["roofline"]
    return merged


def save_suite(out_dir: Path, env: Mapping, suites: Mapping, ctx, status: str) -> list[Path]:
    """Merge one finished suite into ``<out>/<slug>.json`` and rewrite the report and plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = env["gpu_slug"]
    data = merge_suite(load_results(out_dir, slug), env, ctx.suite, suite_result(env, ctx, status))
    json_path, md_path = out_dir / f"{slug}.json", out_dir / f"{slug}.md"
    _write_atomic(json_path, json.dumps(data, indent=1) + "\n")
    _write_atomic(md_path, markdown(data, suites))
    return [json_path, md_path, *write_plots(out_dir, data, suites)]


def _write_atomic(path: Path, text: str) -> None:
    # A run killed mid-write must not leave a truncated JSON that breaks the next merge.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ordered_suites(data: Mapping, suites: Mapping) -> list[str]:
    present = data.get("suites", {})
    return [n for n in suites if n in present] + sorted(n for n in present if n not in suites)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def markdown(data: Mapping, suites: Mapping) -> str:
    lines = [f"# ember benchmarks: {data.get('gpu', '?')}", "",
             "Written by `python -m bench` (bench/report.py) from the JSON beside this file; each "
             "suite shows the run it came from. Cells: rate (fraction of the roofline measured in "
             "the same run); `a / b`: time of b over time of a (above 1: a is faster).", ""]
    for name in _ordered_suites(data, suites):
        description = suites[name].description if name in suites else ""
        lines.append(suite_markdown(name, data["suites"][name], description))
    return "\n".join(lines)


def suite_markdown(name: str, result: Mapping, description: str = "") -> str:
    env = result.get("env", {})
    run = ", ".join(f"{k} {env[k]}" for k in _ENV_LINE_KEYS if env.get(k))
    roof = result.get("roofline") or {}
    if roof:
        run += (f"; roofline: copy {roof['copy_tbps']:.2f} TB/s, "
                f"bf16 matmul {roof['matmul_bf16_tflops']:.0f} TFLOP/s")
    if result.get("quick"):
        run += "; quick run"
    if result.get("status", "complete") != "complete":
        run += f"; {result['status']}"
    lines = [f"## {name}", ""]
    if description:
        lines += [description, ""]
    lines += [f"_{run}_", ""]
    rows = result.get("rows", [])
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"### {op}", "", *op_table([r for r in rows if r["op"] == op]), ""]
    if result.get("notes"):
        lines += ["Notes:", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def _is_param(key: str) -> bool:
    return key not in _RESULT_KEYS and not key.startswith("ratio_to_")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def op_table(rows: Sequence[Mapping]) -> list[str]:
    """One line per case (shape parameters), one column per provider, then ratio columns of
    each non-anchor provider to each anchor. Compute-bound ops show TFLOP/s, others GB/s."""
    params = list(dict.fromkeys(k for r in rows for k in r if _is_param(k)))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    anchors = list(dict.fromkeys(k.removeprefix("ratio_to_") for r in rows for k in r
                                 if k.startswith("ratio_to_")))
    compute_bound = any(r.get("tflops") for r in rows)
    unit = "TFLOP/s" if compute_bound else "GB/s"
    ratio_cols = [(p, a) for p in providers if p not in anchors for a in anchors
                  if any(r["provider"] == p and f"ratio_to_{a}" in r for r in rows)]

    cases: dict[tuple, dict[str, Mapping]] = {}
    for r in rows:
        cases.setdefault(tuple(_fmt(r.get(p, "")) for p in params), {})[r["provider"]] = r

    def rate_cell(r: Mapping | None) -> str:
        if r is None:
            return "—"
        if "error" in r:
            return "error"
        value = r.get("tflops") if compute_bound else r.get("tbps")
        if value is None:
            return "—"
        cell = f"{value:.4g}" if compute_bound else f"{value * 1e3:.4g}"
        if r.get("frac_of_roofline") is not None:
            cell += f" ({100 * r['frac_of_roofline']:.0f}%)"
        if r.get("check", "ok") not in ("ok", "exact"):
            cell += " ✗"
        return cell

    header = [*params, *(f"{p} {unit}" for p in providers), *(f"{p} / {a}" for p, a in ratio_cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, by_provider in cases.items():
        cells = list(key) + [rate_cell(by_provider.get(p)) for p in providers]
        for p, a in ratio_cols:
            ratio = by_provider.get(p, {}).get(f"ratio_to_{a}")
            cells.append(f"{ratio:.2f}×" if ratio is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def write_plots(out_dir: Path, data: Mapping, suites: Mapping) -> list[Path]:
    """``<out>/<slug>_<suite>.png`` for every suite that has a plot function and rows."""
    try:
        import matplotlib
    except ImportError:
        print("  note: matplotlib is not installed; plots skipped", flush=True)
        return []
    matplotlib.use("Agg")
    written = []
    for name in _ordered_suites(data, suites):
        result = data["suites"][name]
        plot = suites[name].plot if name in suites else None
        if plot is not None and result.get("rows"):
            path = Path(out_dir) / f"{data['gpu_slug']}_{name}.png"
            if plot(result["rows"], result, path):
                written.append(path)
    return written


_LINESTYLES = ("-", "--", ":", "-.")


def plot_lines(path: Path, rows: Sequence[Mapping], *, x: str, metric: str,
               panel: Callable[[Mapping], str], series: Callable[[Mapping], str],
               style: Callable[[Mapping], str], title: str, xlabel: str, ylabel: str,
               hline: tuple[float, str] | None = None) -> bool:
    """Line plot of ``metric`` against ``x`` (log2 axis): one panel per ``panel(row)``, one
    colour per ``series(row)``, one line style per ``style(row)``; ``hline`` = (value, label)
    draws a ceiling. Rows without the metric are left out. Returns whether a file was written."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        return False
    panels = list(dict.fromkeys(panel(r) for r in rows))
    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(series(r) for r in rows))}
    styles = {s: _LINESTYLES[i % len(_LINESTYLES)]
              for i, s in enumerate(dict.fromkeys(style(r) for r in rows))}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in rows:
            if panel(r) == name:
                lines.setdefault((series(r), style(r)), []).append((r[x], r[metric]))
        xs = sorted({p[0] for pts in lines.values() for p in pts})
        for (s, st), pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[s],
                    linestyle=styles[st], label=f"{s}, {st}")
        if hline is not None:
            ax.axhline(hline[0], color="grey", linestyle=":", linewidth=1, label=hline[1])
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v / 1024:g}k" if v >= 1024 else f"{v:g}" for v in xs])
        ax.set_ylim(bottom=0)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
