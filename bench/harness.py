"""Benchmark harness: suite registry, timer, input rotation, result rows, and the CLI.

A suite is one module under ``bench/`` that registers a function taking a ``Context``::

    @suite("moe", order=40, description="grouped GEMM ...", plot=plot_moe)
    def run(ctx):
        rot = Rotation(lambda: make_inputs(...))           # copies of the inputs, > L2 in total
        ctx.bench(op="grouped_gemm", params={"tokens": 4096, ...},
                  flops=..., bytes=...,                     # explicit formulas, in the suite
                  providers={"ember-cuda": rot.bind(ember_fn), "grouped-mm": rot.bind(anchor)},
                  anchors=("grouped-mm",))

``python -m bench`` imports every module of this package, runs the ``roofline`` suite first (its
copy bandwidth and bf16 matmul rate normalise every other row of the same run), then the chosen
suites, and hands each suite's rows to ``bench.report`` as soon as the suite finishes.

Row fields: ``op``, the shape parameters, ``provider``, ``ms`` (median), ``tflops``, ``tbps``,
``frac_of_roofline`` (roofline time ``max(flops / peak_flops, bytes / copy_bandwidth)`` over the
measured time), ``ratio_to_<anchor>`` (anchor time / provider time: above 1 is faster than the
anchor), plus whatever the suite adds (``check``, ``rel_err``). ``error`` replaces the numbers
when a provider failed.
"""

import argparse
import dataclasses
import hashlib
import importlib
import itertools
import math
import os
import pkgutil
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import report

ROOFLINE_SUITE = "roofline"
# Where suites put their tensors. Benchmarks need a GPU; the CPU tests set "cpu" to run the
# suites' plumbing on tiny sizes.
DEVICE = "cuda"
# Files whose content decides the numbers; hashed into every run so results can be matched to
# code even where the checkout has no .git (the GPU machine gets a bare copy of the tree).
_SOURCE_ROOTS = ("csrc", "triton_kernels", "neuron_kernels", "python/ember", "bench",
                 "CMakeLists.txt", "setup.py")
_SOURCE_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".cpp", ".txt"}


# ----------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    run: Callable[["Context"], None]
    order: int
    description: str
    # plot(rows, suite_result, path): draws the suite's PNG from its rows (None: no plot).
    plot: Callable | None = None


SUITES: dict[str, Suite] = {}


def suite(name: str, *, order: int, description: str, plot: Callable | None = None):
    """Register ``run(ctx)`` as suite ``name``; ``order`` sorts suites in runs and reports."""
    def register(run):
        SUITES[name] = Suite(name, run, order, " ".join(description.split()), plot)
        return run
    return register


def discover_suites() -> dict[str, Suite]:
    """Import every module of the bench package (each registers its suites), sorted by order."""
    import bench

    for info in pkgutil.iter_modules(bench.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"bench.{info.name}")
    return dict(sorted(SUITES.items(), key=lambda item: (item[1].order, item[0])))


# ----------------------------------------------------------------------------------------------
# Formulas shared by several suites (suite-specific ones live in the suite's file)
# ----------------------------------------------------------------------------------------------

def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an [m, k] x [k, n] product: one multiply and one add per term."""
    return 2.0 * m * n * k


def copy_bytes(nbytes: int) -> float:
    """Device memory traffic of copying ``nbytes``: read once plus written once."""
    return 2.0 * nbytes


def derive_metrics(ms: float, flops: float, nbytes: float, roofline: Mapping | None,
                   compute_peak: str = "matmul_bf16_tflops") -> dict:
    """Rates of one timing and its fraction of the roofline measured in the same run.

    ``roofline`` maps ``copy_tbps`` and ``compute_peak`` (e.g. ``matmul_bf16_tflops``) to the
    measured ceilings; the roofline time is the larger of flops/peak and bytes/bandwidth.
    """
    seconds = ms * 1e-3
    out = {
        "ms": ms,
        "tflops": flops / seconds / 1e12 if flops else None,
        "tbps": nbytes / seconds / 1e12 if nbytes else None,
        "frac_of_roofline": None,
    }
    if roofline:
        floor_s = max(flops / (roofline[compute_peak] * 1e12),
                      nbytes / (roofline["copy_tbps"] * 1e12))
        out["frac_of_roofline"] = floor_s / seconds
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32: a sanity check that a timed kernel computes the
    same function as its anchor (wrong indexing gives O(1), bf16 rounding about 4e-3)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# Timing and inputs
# ----------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 120) -> float:
    """Median time of ``fn()`` in milliseconds, by CUDA events around each call.

    ``triton.testing.do_bench`` runs ``fn`` once (compilation, autotuning, handle creation), then
    ``warmup_ms`` worth of calls, then ``rep_ms`` worth of timed calls, zeroing a 256 MB buffer
    before each so that the L2 cache starts cold.
    """
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_time_ms(fn: Callable[[], object], *, warmup_ms: float = 25,
                  rep_ms: float = 120) -> float:
    """Median time of one ``fn()`` in milliseconds, replayed from a CUDA graph.

    ``triton.testing.do_bench_cudagraph`` captures ``fn`` (several calls per graph) and times
    graph replays, so the host's launch cost and the gaps between calls drop out: what remains is
    the GPU time of back-to-back calls, as when a model's CUDA graph runs them. No L2 flush: the
    inputs must rotate (``Rotation``) if they could otherwise stay in L2. The function warms up
    by its own capture runs, so ``warmup_ms`` is unused.
    """
    from triton.testing import do_bench_cudagraph

    del warmup_ms
    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def l2_cache_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def tensor_bytes(obj) -> int:
    """Total bytes of the tensors in ``obj`` (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Rotation:
    """Copies of one benchmark's inputs, used in turn so that no call finds its inputs in L2.

    ``make_inputs()`` returns the arguments of one call, with fresh random data each time. Copies
    are made until together they hold ``min_bytes`` (default: twice the L2 cache), at most
    ``max_copies``; inputs larger than that get one copy. ``bind(fn)`` returns a zero-argument
    callable that calls ``fn(*inputs)`` on the next copy; ``inputs[0]`` serves checks.
    """

    def __init__(self, make_inputs: Callable[[], Sequence], *, min_bytes: int | None = None,
                 max_copies: int = 256):
        first = tuple(make_inputs())
        if min_bytes is None:
            min_bytes = 2 * l2_cache_bytes()
        per_copy = tensor_bytes(first)
        copies = 1 if per_copy == 0 else max(1, min(max_copies, math.ceil(min_bytes / per_copy)))
        self.inputs = [first] + [tuple(make_inputs()) for _ in range(copies - 1)]

    def bind(self, fn: Callable) -> Callable[[], object]:
        cycle = itertools.cycle(self.inputs)
        return lambda: fn(*next(cycle))


# ----------------------------------------------------------------------------------------------
# The per-suite context: timing providers and recording rows
# ----------------------------------------------------------------------------------------------

class FatalCudaError(RuntimeError):
    """A provider broke the CUDA context (illegal address, ...): nothing later can be timed."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _format_params(params: Mapping) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _round(value, digits: int = 5):
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return value


class Context:
    """What a suite's ``run(ctx)`` gets: timing, row recording, notes and the roofline."""

    def __init__(self, suite_name: str, *, quick: bool = False, roofline: dict | None = None,
                 timer: Callable | None = None, graph_timer: Callable | None = None):
        self.suite = suite_name
        self.quick = quick
        self.roofline = roofline
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (25, 120)
        self._timer = timer or time_ms
        # A caller's timer (a test's stub) stands in for graph timing too unless one is given.
        self._graph_timer = graph_timer or (timer if timer is not None else graph_time_ms)
        self.rows: list[dict] = []
        self._notes: list[str] = []
        # (op, provider, error) -> the cases it happened in: one note per distinct failure.
        self._failures: dict[tuple[str, str, str], list[str]] = {}

    @property
    def notes(self) -> list[str]:
        failures = []
        for (op, provider, error), cases in self._failures.items():
            more = f" and {len(cases) - 1} more case(s)" if len(cases) > 1 else ""
            failures.append(f"{op}: {provider} failed ({cases[0]}{more}): {error}")
        return self._notes + failures

    def note(self, message: str) -> None:
        if message not in self._notes:
            self._notes.append(message)
            print(f"  note: {message}", flush=True)

    def guarded(self, what: str, fn: Callable[[], object]):
        """``fn()``, or None with a note if it raises (``FatalCudaError`` if CUDA broke)."""
        try:
            return fn()
        except Exception as exc:  # one failing check must not end the whole run
            _raise_if_cuda_broken(exc)
            self.note(f"{what} failed: {_first_line(exc)}")
            return None

    def time(self, fn: Callable[[], object], *, graph: bool = False) -> float:
        """``fn``'s time in ms: by the graph timer (``graph_time_ms``) with ``graph``, else by the
        suite's timer (``time_ms``)."""
        timer = self._graph_timer if graph else self._timer
        return timer(fn, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)

    def bench(self, *, op: str, params: Mapping, flops: float, bytes: float,
              providers: Mapping[str, Callable[[], object]], anchors: Iterable[str] = (),
              extras: Mapping[str, Mapping] | None = None,
              compute_peak: str = "matmul_bf16_tflops",
              graph_timed: Iterable[str] = ()) -> list[dict]:
        """Time every provider on one case and record a row each (see ``record``).

        Providers named in ``graph_timed`` are timed by CUDA-graph replay (``graph_time_ms``),
        the others by the suite's timer; with ``graph_timed`` given, each row says which in
        ``timing``. A provider that raises gets a row with ``error`` and a note; if it left the
        CUDA context broken, ``FatalCudaError`` stops the run (the rows so far are still saved).
        """
        times: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        graph_timed = set(graph_timed)
        if graph_timed:
            extras = {name: {**(extras or {}).get(name, {}),
                             "timing": "graph" if name in graph_timed else "events"}
                      for name in providers}
        for name, fn in providers.items():
            try:
                times[name] = self.time(fn, graph=name in graph_timed)
            except Exception as exc:  # a provider failing must not end the whole run
                _raise_if_cuda_broken(exc)
                times[name] = None
                errors[name] = _first_line(exc)
                cases = self._failures.setdefault((op, name, errors[name]), [])
                if not cases:
                    print(f"  {op} {_format_params(params)}: {name} failed: {errors[name]}",
                          flush=True)
                cases.append(_format_params(params))
        return self.record(op=op, params=params, flops=flops, bytes=bytes, times=times,
                           anchors=anchors, extras=extras, errors=errors,
                           compute_peak=compute_peak)

    def record(self, *, op: str, params: Mapping, flops: float, bytes: float,
               times: Mapping[str, float | None], anchors: Iterable[str] = (),
               extras: Mapping[str, Mapping] | None = None, errors: Mapping[str, str] | None = None,
               compute_peak: str = "matmul_bf16_tflops") -> list[dict]:
        """Rows for one case from measured times (ms; None when the provider failed)."""
        anchors = [a for a in anchors if times.get(a)]
        rows = []
        for name, ms in times.items():
            row = {"op": op, **params, "provider": name}
            if ms is None:
                row["error"] = (errors or {}).get(name, "failed")
            else:
                row.update(derive_metrics(ms, flops, bytes, self.roofline, compute_peak))
                for anchor in anchors:
                    if anchor != name:
                        row[f"ratio_to_{anchor}"] = times[anchor] / ms
            row.update((extras or {}).get(name, {}))
            rows.append({k: _round(v) for k, v in row.items()})
        self.rows.extend(rows)
        return rows


def _raise_if_cuda_broken(exc: BaseException) -> None:
    if not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as sync_exc:
        raise FatalCudaError(f"CUDA context broken after {_first_line(exc)}") from sync_exc


# ----------------------------------------------------------------------------------------------
# ember providers
# ----------------------------------------------------------------------------------------------

def ember_backends(op: str, wanted: Sequence[str] = ("cuda", "triton")
                   ) -> tuple[list[str], list[str]]:
    """The ``wanted`` ember backends of ``op`` that can run on this GPU, and a note for each
    one that cannot (op not written yet, backend not implemented, ember._C not built...)."""
    from ember.ops import _registry

    runnable, notes = [], []
    for backend in wanted:
        try:
            _registry.resolve(op, backend, torch.device(DEVICE))
        except ValueError as exc:
            notes.append(f"ember-{backend} skipped for {op}: {exc}")
        else:
            runnable.append(backend)
    return runnable, notes


# ----------------------------------------------------------------------------------------------
# Environment of a run
# ----------------------------------------------------------------------------------------------

def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """$EMBER_GIT_COMMIT, else ``git rev-parse HEAD`` (+ '-dirty'), else 'unknown'."""
    if os.environ.get("EMBER_GIT_COMMIT"):
        return os.environ["EMBER_GIT_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=report.REPO_ROOT, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def source_digest() -> str:
    """Short sha256 over the kernel, runtime and bench sources (paths and contents)."""
    digest = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        path = report.REPO_ROOT / root
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if (f.is_file() and f.suffix in _SOURCE_SUFFIXES and "__pycache__" not in f.parts
                    and "results" not in f.relative_to(report.REPO_ROOT).parts):
                digest.update(str(f.relative_to(report.REPO_ROOT)).encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict:
    import triton

    from ember.ops import _ext

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "gpu_slug": gpu_slug(props.name),
        "sm_count": props.multi_processor_count,
        "l2_mb": round(props.L2_cache_size / 2**20, 1),
        "memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "ember_C_built": _ext.load_extension() is not None,
        "commit": git_commit(),
        "source_digest": source_digest(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

NO_GPU_MESSAGE = ("No CUDA GPU is visible (torch.cuda.is_available() is False): the ember "
                  "benchmarks need one, so nothing was run.")


def main(argv: Sequence[str] | None = None) -> int:
    suites = discover_suites()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time ember's kernels against torch/cuDNN/cuBLAS on this GPU; results go to "
                    "<out>/<gpu>.json (merged suite by suite), <gpu>.md and PNG plots.")
    parser.add_argument("suites", nargs="*", metavar="suite",
                        help=f"suites to run (default: all): {', '.join(suites)}")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and shorter timing (a smoke run; rows are marked quick)")
    parser.add_argument("--out", type=Path, default=report.DEFAULT_OUT,
                        help="results directory (default: bench/results)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)

    unknown = [s for s in args.suites if s not in suites]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; available: {', '.join(suites)}")
    if args.list:
        for s in suites.values():
            print(f"{s.name:16s} {s.description.split('. ')[0]}")
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0

    # The roofline always runs first: every other row is normalised by it.
    chosen = set(args.suites or suites) | {ROOFLINE_SUITE}
    order = [name for name in suites if name in chosen]
    env = environment()
    print(f"ember bench on {env['gpu']} ({env['sm_count']} SMs, {env['l2_mb']} MB L2): "
          f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
          f"commit {env['commit']}, sources {env['source_digest']}"
          f"{', quick' if args.quick else ''}", flush=True)

    roofline = None
    for name in order:
        print(f"\n== {name}", flush=True)
        ctx = Context(name, quick=args.quick, roofline=roofline)
        status = "complete"
        try:
            suites[name].run(ctx)
        except KeyboardInterrupt:
            status = "interrupted"
        except FatalCudaError as exc:
            status = f"stopped: {exc}"
        roofline = ctx.roofline
        written = report.save_suite(args.out, env, suites, ctx, status)
        print(report.suite_markdown(name, report.suite_result(env, ctx, status),
                                    suites[name].description), flush=True)
        print("wrote " + ", ".join(str(p) for p in written), flush=True)
        if status != "complete":
            print(f"suite {name} {status}; later suites not run", flush=True)
            return 1
    return 0

