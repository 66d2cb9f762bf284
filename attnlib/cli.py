"""``attnlib`` command line: ``info`` (environment, backends), ``check`` (the conformance matrix) and ``bench``
(the backends that can run here, timed on named workloads or your shapes)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import time

import torch

from . import benchmark, conformance, settings, versions
from .arguments import UsageError, backend_args, device_arg
from .backends.base import ALL_FEATURES, dtype_name
from .registry import alias_map, auto_order, get_backend, list_backends

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report anything that stops the import
        return f"not installed ({type(e).__name__})" if isinstance(e, ImportError) else f"broken: {e}"
    return getattr(mod, "__version__", "installed")


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    return "cpu (no CUDA device)"


def cmd_info(args) -> int:
    print(f"attnlib     {__import__('attnlib').__version__}")
    # the supported ranges (attnlib.versions): backend packages are imported (a broken install shows), the
    # host libraries of the integrations only looked up
    imported = {"torch": "torch", "triton": "triton", "flash-attn": "flash_attn", "xformers": "xformers"}
    for e in versions.SUPPORTED:
        here = _version(imported[e.package]) if e.package in imported else versions.installed(e.package)
        print(f"{e.package:12s} {here or 'not installed'}  (supported: {versions.supported_range(e)})")
    print(f"{'flash-attn3':12s} {_version('flash_attn_interface')}")
    print(f"device      {_device()}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"auto order  {' > '.join(auto_order(dev))} ({dev})")
    print(f"aliases     {len(alias_map())} other spellings of the backend names (attnlib info --aliases)")
    print()
    rows = list_backends()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "available" if r["available"] else "unavailable"
        detail = r["implementation"] if r["available"] else r["reason"]
        print(f"  {r['name']:{width}s}  {status:11s}  {detail}")
    from .known_defects import KNOWN_DEFECTS

    print("\nknown upstream defects (routed around; reproductions in scripts/)")
    for d in KNOWN_DEFECTS:
        state = ("guard on" if d.guard_active() else "guard OFF") if d.applies() else "not applicable here"
        print(f"  {d.name} [{state}]: {d.library}; {d.affected}\n    symptom: {d.symptom}\n    handling: {d.handling}")
    print("\nenvironment variables read (attnlib info --env: the table as markdown)")
    plain = lambda text: text.replace("`", "")  # noqa: E731
    width = max(len(v.name) for v in settings.ENV_VARS)
    for var, (_, value) in zip(settings.ENV_VARS, settings.current_values()):
        here = f"= {value!r}" if value is not None else "unset"
        print(f"  {var.name:{width}s}  {here}  (default: {plain(var.default)}; values: {plain(var.values)})\n"
              f"  {'':{width}s}  {plain(var.meaning)}")
    return 0


def capability_matrix(names=None) -> str:
    """The backend x capability table as markdown (docs/backends.md embeds it); ``names``: the backends
    (default: every registered one). A feature is ``yes`` when the backend's kernel does it, ``LSE`` when the
    dispatch serves it through the backend's LSE (several calls merged, or sinks rescaled), ``gather`` when
    the dispatch gathers the pages the requests use into contiguous keys."""
    feats = sorted(ALL_FEATURES)
    head = ["backend", "devices", "dtypes", "max head dim", *feats, "GQA", "LSE", "Dv != D", "autograd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    yes = lambda b: "yes" if b else "—"  # noqa: E731

    def cell(c, f):
        if f in c.features:
            return "yes"
        if f in c.served():
            return "gather" if f == "paged" else "LSE"
        return "—"

    for name in names or [r["name"] for r in list_backends()]:
        c = get_backend(name).capabilities
        grad_on = sorted(d for d in c.devices if c.autograd_on(d))
        grad = "yes" if len(grad_on) == len(c.devices) else (f"{', '.join(grad_on)} only" if grad_on else "—")
        cells = [name, ", ".join(sorted(c.devices)), ", ".join(sorted(dtype_name(d) for d in c.dtypes)),
                 str(c.max_head_dim or "any"), *[cell(c, f) for f in feats], yes(c.gqa), yes(c.lse),
                 yes(c.head_dim_v_differs), grad]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alias_table(mapping: dict[str, str] | None = None) -> str:
    """The accepted spellings per backend as markdown (docs/backends.md embeds it); ``mapping``: alias ->
    canonical name (default: every alias registered now)."""
    mapping = alias_map() if mapping is None else mapping
    by_backend: dict[str, list[str]] = {}
    for alias, name in mapping.items():
        by_backend.setdefault(name, []).append(alias)
    lines = ["| canonical | also accepted |", "|---|---|"]
    for name, spellings in by_backend.items():
        lines.append(f"| `{name}` | " + ", ".join(f"`{a}`" for a in spellings) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.1e}" if x else "0"


def _check_plan(args):
    """Validate the arguments: ``(device, names, unavailable, dtypes, cases)`` or ``UsageError``."""
    dev = device_arg(args.device)
    if args.backend:
        names, unavailable = backend_args(args.backend, "--backend", "check (or leave --backend out for all)")
    else:
        names, unavailable = [r["name"] for r in list_backends() if r["available"]], []
    dtypes = [_DTYPES[d] for d in args.dtype]
    cases = list(conformance.CASES)
    if args.fuzz:
        cases += conformance.fuzz_cases(args.fuzz, seed=args.seed)
    if args.case:
        known = {c.name for c in cases}
        wrong = [c for c in args.case if c not in known]
        if wrong:
            raise UsageError(f"--case {', '.join(wrong)}: unknown; valid cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in args.case]
    sections = conformance.check_sections()
    unknown = [n for n in args.skip_section or () if n not in sections]
    if unknown:
        raise UsageError(f"--skip-section {', '.join(unknown)}: unknown; sections here: "
                         f"{', '.join(sections) or 'none installed'}")
    return dev, names, unavailable, dtypes, cases


def _cell(args, name: str, case, dtype, dev) -> tuple[str, int, str]:
    """``(cell text, failing comparisons, skip reason)`` of one backend on one case and dtype; the text is
    ``n/a`` or ``--full`` when nothing ran."""
    backend = get_backend(name)
    if dtype not in backend.capabilities.dtypes:
        return f"{'n/a':>18s}", 0, f"{name} does not take {dtype_name(dtype)}"
    if not args.full and dev == "cpu" and name in conformance.SLOW_ON_CPU and dtype != torch.float32:
        return f"{'--full':>18s}", 0, ""
    worst_ratio, worst, skip, failures = 0.0, None, "", 0
    for gqa in conformance.gqa_ratios(name, dtype, dev):
        grad = args.grad and backend.capabilities.autograd_on(dev) and dtype != torch.float16
        r = conformance.run_case(name, case, dtype, gqa, device=dev, grad=grad)
        if r.skipped:
            skip = r.skipped
            continue
        for c in r.comparisons:
            ratio = c.error / c.tol if c.tol else float("inf")
            if ratio >= worst_ratio:
                worst_ratio, worst = ratio, c
            failures += not c.passed
    if worst is None:
        return f"{'n/a':>18s}", 0, skip
    mark = "ok" if worst_ratio <= 1 else "FAIL"
    return f"{_fmt(worst.error) + '/' + _fmt(worst.tol) + ' ' + mark:>18s}", failures, ""


def _defects_section(names, dev) -> int:
    """Known upstream defects of the checked backends: a failure when one is present and unguarded."""
    from .known_defects import KNOWN_DEFECTS

    failures = 0
    relevant = [d for d in KNOWN_DEFECTS if d.backend in names and d.device == dev and d.applies()]
    if not relevant:
        return 0
    print("\nknown upstream defects")
    for d in relevant:
        if d.guard_active():
            print(f"  {d.name:28s} guarded: {d.handling}")
            continue
        present, output = d.run_reproduction()
        status = "PRESENT and unguarded: FAIL" if present else "guard off, reproduction clean"
        failures += present
        print(f"  {d.name:28s} {status} (scripts/{d.reproduction})")
        for line in output.splitlines():
            print(f"      {line}")
    return failures


#: seconds between progress lines of `attnlib check` when stderr is not a terminal (a terminal gets a live bar)
PROGRESS_INTERVAL = 30.0


def _reexec_interpreted(args, argv) -> int | None:
    """``check --full`` on a CPU: the triton backend only runs under ``TRITON_INTERPRET=1`` set before triton
    is imported, so rerun this command in a child process with it set; its exit status, or None to go on."""
    if not args.full or os.environ.get(settings.TRITON_INTERPRET) == "1" or importlib.util.find_spec("triton") is None:
        return None
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    asked = args.backend and "triton" not in {n.lower() for n in args.backend}
    if dev != "cpu" or asked:
        return None
    print("attnlib check --full: rerunning under TRITON_INTERPRET=1 (the triton backend's kernels, interpreted on "
          "the CPU)", flush=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "attnlib", *argv], env=env)


def _summary(verdict: str, counts: dict, sections_failed: int, names, dtypes, dev: str, seconds: float) -> str:
    """One line to paste into a bug report: verdict, counts, versions, machine, what ran, time."""
    from . import __version__
    from .benchmark import device_text, machine_info

    optional = [f"{label} {v}" for label, mod in (("triton", "triton"), ("flash-attn", "flash_attn"),
                                                  ("xformers", "xformers"))
                if not (v := _version(mod)).startswith("not installed")]
    interp = ", TRITON_INTERPRET=1" if os.environ.get(settings.TRITON_INTERPRET) == "1" else ""
    meta = {"machine_info": machine_info(torch.device(dev))}
    return (f"summary: attnlib check {verdict}: {counts['ok']} ok, {counts['FAIL']} failed, {counts['n/a']} n/a, "
            f"{counts['--full']} need --full; sections {sections_failed} failed | attnlib {__version__}, torch "
            f"{torch.__version__}, " + "".join(f"{o}, " for o in optional) + f"python {platform.python_version()} | "
            f"{dev}: {device_text(meta)}{interp} | backends {','.join(names)} | "
            f"{','.join(dtype_name(d) for d in dtypes)} | {seconds:.0f} s")


def cmd_check(args) -> int:
    try:
        dev, names, unavailable, dtypes, cases = _check_plan(args)
    except UsageError as e:
        print(f"attnlib check: {e}", file=sys.stderr)
        return 2
    if not names:
        for r in unavailable:
            print(f"FAIL: {r['name']} was asked for and cannot run here: {r['reason']}")
        print("FAILED: no backend to check")
        return 1
    from .progress import Progress

    t0 = time.perf_counter()
    print(f"attnlib check: {len(names)} backend(s) x {len(cases)} cases x {len(dtypes)} dtypes x GQA "
          f"{list(conformance.HEADS)} on {dev}, vs float64 math (tolerance: attnlib.testing)")
    print()
    failures, ran = 0, 0
    counts = {"ok": 0, "FAIL": 0, "n/a": 0, "--full": 0}
    header = f"{'case':24s} {'mask':15s} {'dtype':5s} " + " ".join(f"{n:>18s}" for n in names)
    print(header)
    print("-" * len(header))
    progress = Progress(len(cases) * len(dtypes) * len(names), "attnlib check", interval=PROGRESS_INTERVAL)
    for case in cases:
        for dtype in dtypes:
            cells = []
            for name in names:
                progress.update(f"{case.name} {dtype_name(dtype)} {name}")
                text, bad, skip = _cell(args, name, case, dtype, dev)
                progress.update(advance=1)
                cells.append(text)
                failures += bad
                counts[text.split()[-1]] += 1
                ran += not text.strip().startswith(("n/a", "--full"))
                if args.verbose and skip:
                    progress.print(f"    [{name} skips {case.name}: {skip}]")
            progress.print(f"{case.name:24s} {case.kind:15s} {dtype_name(dtype):5s} " + " ".join(cells))
    progress.close()
    matrix_failures = failures
    print()
    print("cells: worst max|error| / tolerance over GQA 1,2,4 and {out, lse" + (", grads" if args.grad else "")
          + "}; n/a = the backend cannot serve that call (`attnlib check -v` says why)")
    slow = sorted(set(names) & conformance.SLOW_ON_CPU) if dev == "cpu" else []
    if slow and args.full:
        print(f"{', '.join(slow)} on cpu: one GQA ratio per dtype (fp32: 1, bf16: 2, fp16: 4) - compiled/interpreted")
    elif any(d != torch.float32 and d in get_backend(n).capabilities.dtypes for n in slow for d in dtypes):
        print(f"{', '.join(slow)} on cpu: fp32 only (each new shape compiles; --full adds the other dtypes they take)")
    for r in unavailable:
        print(f"FAIL: {r['name']} was asked for and cannot run here: {r['reason']}")
        failures += 1
    if not args.backend:
        for r in list_backends():
            if not r["available"]:
                print(f"not checked: {r['name']}: {r['reason']}")
    failures += _defects_section(names, dev)
    skip = set(args.skip_section or ()) | ({"models"} if args.no_models else set())
    for section_name, section in conformance.check_sections().items():
        if section_name not in skip:
            failures += section(list(names), dev)
    dt = time.perf_counter() - t0
    sections_failed = failures - matrix_failures - len(unavailable)
    if ran == 0:
        print("\nFAILED: no comparison ran (no backend could serve the cases and dtypes asked for)")
        print(_summary("FAILED", counts, sections_failed, names, dtypes, dev, dt))
        return 1
    print()
    print(f"{'FAILED' if failures else 'PASSED'}: {failures} failing comparison(s), {ran} cells checked, {dt:.1f}s")
    print(_summary("FAILED" if failures else "PASSED", counts, sections_failed, names, dtypes, dev, dt))
    return 1 if failures else 0


def _parallel_plan(args):
    """Validate ``attnlib check --parallel N``: ``(world, device, backends, unavailable, names)`` or ``UsageError``."""
    import torch.distributed as dist

    from .parallel import conformance as spc

    world = args.parallel
    if world < 2:
        raise UsageError(f"--parallel {world}: sequence parallelism needs at least 2 processes; use --parallel 2 "
                         "or more (plain `attnlib check` checks single-process attention)")
    if args.dtype:
        raise UsageError("--dtype does not apply with --parallel: each sequence-parallel case has its own dtype")
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: give the seconds the whole run may take (> 0)")
    if not dist.is_available():
        raise UsageError(f"--parallel: torch {torch.__version__} was built without torch.distributed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = device_arg(args.device, "cuda" if gpus >= world and dist.is_nccl_available() else "cpu")
    if dev == "cuda" and gpus < world:
        fewer = f"--parallel {gpus} or fewer, or " if gpus >= 2 else ""
        raise UsageError(f"--device cuda --parallel {world}: NCCL needs one GPU per process and torch sees {gpus} "
                         f"here; use {fewer}--device cpu (gloo)")
    if dev == "cuda" and not dist.is_nccl_available():
        raise UsageError("--device cuda --parallel: this torch has no NCCL; use --device cpu (gloo)")
    if dev == "cpu" and not dist.is_gloo_available():
        raise UsageError("--parallel on cpu needs the gloo backend, which this torch lacks")
    backends, unavailable = backend_args(args.backend, "--backend",
                                         "check (or leave --backend out for the cases' own)")
    matrix = spc.cases(world)
    if args.case:
        wrong = [c for c in args.case if c not in matrix]
        if wrong:
            raise UsageError(f"--case {', '.join(wrong)}: unknown with --parallel {world}; valid cases: "
                             f"{', '.join(matrix)}")
    return world, dev, backends, unavailable, args.case or None


def _ratio_text(r: float) -> str:
    return "inf" if r == float("inf") else f"{r:.3f}" if r < 10 else f"{r:.3g}"


def _parallel_cell(res: dict) -> tuple[str, str]:
    """``(cell text, status)`` of one rank's result; status ``ok``, ``FAIL`` or ``n/a``."""
    if res.get("skipped"):
        return "n/a", "n/a"
    status = "ok" if res["ok"] else "FAIL"
    if "ratio" in res:
        return f"{_ratio_text(res['ratio'])} {res.get('worst', '')} {status}", status
    assertion = res.get("error", "").startswith(("AssertionError", "CaseFailure"))
    return (status if res["ok"] or assertion else "ERROR"), status


def cmd_check_parallel(args) -> int:
    """``attnlib check --parallel N``: the sequence-parallel matrix on N local processes."""
    from .parallel import conformance as spc

    try:
        world, dev, backends, unavailable, names = _parallel_plan(args)
    except UsageError as e:
        print(f"attnlib check: {e}", file=sys.stderr)
        return 2
    for r in unavailable:
        print(f"FAIL: {r['name']} was asked for and cannot run here: {r['reason']}")
    if unavailable and not backends:
        print("FAILED: no backend to check")
        return 1
    dist_backend = "nccl" if dev == "cuda" else "gloo"
    t0 = time.perf_counter()
    print(f"attnlib check --parallel {world}: sequence parallelism (Ulysses, ring, hybrid) on {world} local "
          f"processes ({dist_backend}, {dev}), vs the float64 reference (tolerance: attnlib.testing)")
    sys.stdout.flush()          # before the children write anything
    matrix, results = spc.run_matrix(world, names=names, backends=backends or None, device=dev,
                                     timeout_s=args.timeout, dist_backend=dist_backend)
    print()
    cells_of = {name: [_parallel_cell(results[r][name]) for r in range(world)] for name in matrix}
    cw = max([len("case")] + [len(n) for n in matrix])
    sw = max([len("strategy")] + [len(spc.strategy(o, world)) for o in matrix.values()])
    rw = max([14] + [len(text) for cells in cells_of.values() for text, _ in cells])
    header = (f"{'case':{cw}s} {'strategy':{sw}s} {'backend':8s} {'dtype':5s} "
              + " ".join(f"{'rank ' + str(r):>{rw}s}" for r in range(world)) + f" {'s':>6s}")
    print(header)
    print("-" * len(header))
    failed = skipped = 0
    for name, opt in matrix.items():
        attn = opt.get("kind", "attn") in spc.ATTENTION_KINDS
        per_rank = [results[r][name] for r in range(world)]
        cells = cells_of[name]
        statuses = {s for _, s in cells}
        failed += "FAIL" in statuses
        skipped += statuses == {"n/a"}
        backend = opt["backend"] if attn else "-"
        dtype = dtype_name(opt.get("dtype", torch.float32)) if attn else "-"
        secs = max(res.get("s", 0.0) for res in per_rank)
        print(f"{name:{cw}s} {spc.strategy(opt, world):{sw}s} {backend:8s} {dtype:5s} "
              + " ".join(f"{text:>{rw}s}" for text, _ in cells) + f" {secs:6.2f}")
        for r, res in enumerate(per_rank):
            if not res["ok"]:
                lines = res.get("error", "").strip().splitlines() or ["(no message)"]
                shown = lines if args.verbose else lines[:1]
                print(f"    rank {r}: " + "\n    ".join(shown))
        first = per_rank[0]
        if first.get("skipped") and args.verbose:
            print(f"    [{first['skipped']}]")
        for msg in first.get("fallbacks", ()):
            print(f"    [rank 0: {msg}]")
    print()
    print("cells: per rank, the worst max|error| / tolerance over out, lse (the *_lse cases), dq, dk, dv and which "
          "one (> 1 fails); ok/FAIL for shard/gather and the expected errors; n/a: the backend cannot serve the "
          "call (`-v` says why)")
    dt = time.perf_counter() - t0
    failures = failed + len(unavailable)
    ran = len(matrix) - skipped
    print()
    print(f"{'FAILED' if failures or not ran else 'PASSED'}: {failed} failing case(s) of {len(matrix)} on {world} "
          f"processes, {ran} checked, {skipped} n/a, {dt:.1f}s")
    return 1 if failures or not ran else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnlib", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info", help="versions, device and one row per backend (available / why not)")
    i.add_argument("--capabilities", action="store_true", help="print the capability matrix as markdown")
    i.add_argument("--aliases", action="store_true", help="print the accepted backend spellings as markdown")
    i.add_argument("--env", action="store_true", help="print the environment variables attnlib reads as markdown")
    c = sub.add_parser("check", help="conformance matrix of every available backend against float64 math")
    c.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    c.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="dtypes (default fp32 bf16 fp16)")
    c.add_argument("--case", action="append", help="only this case (repeatable)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    c.add_argument("--grad", action="store_true", help="also compare gradients")
    c.add_argument("--full", action="store_true",
                   help="every dtype on compiled/interpreted backends too (slow on cpu); on a cpu with triton "
                        "installed it reruns itself under TRITON_INTERPRET=1 so that the triton backend runs")
    c.add_argument("--skip-section", action="append", metavar="NAME",
                   help="leave out a section contributed by a package (repeatable; e.g. models)")
    c.add_argument("--no-models", action="store_true", help="same as --skip-section models")
    c.add_argument("--fuzz", type=int, default=8, metavar="N",
                   help="also run N random cases (tile-edge lengths, head dims 8..128, every structured mask; "
                        "default 8, 0 for none)")
    c.add_argument("--seed", type=int, default=0, help="seed of the --fuzz cases (default 0)")
    c.add_argument("-v", "--verbose", action="store_true", help="print why a backend skips a case")
    c.add_argument("--parallel", type=int, metavar="N",
                   help="instead: the sequence-parallel matrix (Ulysses, ring, hybrid; forward, LSE and gradients vs "
                        "float64) on N local processes: gloo on cpu, NCCL on cuda (one GPU per process); --backend "
                        "runs every case on that backend, --case picks cases")
    c.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --parallel: stop the processes after S seconds (default 300)")
    b = sub.add_parser("bench", help="time every backend that can run here (each checked against math first) on "
                                     "named workloads or --shape; table, JSON, chart")
    benchmark.add_arguments(b)
    args = p.parse_args(argv)
    if args.cmd == "bench":
        return benchmark.main(args)
    if args.cmd == "info":
        tables = [(args.capabilities, capability_matrix), (args.aliases, alias_table),
                  (args.env, settings.markdown_table)]
        if any(asked for asked, _ in tables):
            print("\n\n".join(make() for asked, make in tables if asked))
            return 0
        return cmd_info(args)
    if args.parallel is not None:
        return cmd_check_parallel(args)
    rerun = _reexec_interpreted(args, argv)
    if rerun is not None:
        return rerun
    args.dtype = args.dtype or ["fp32", "bf16", "fp16"]
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
