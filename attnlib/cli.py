"""``attnlib`` command line: ``info`` (environment, backends) and ``check`` (the conformance matrix)."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from . import conformance, settings
from .backends.base import ALL_MASK_FEATURES, dtype_name
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
    print(f"torch       {torch.__version__}")
    for name, mod in (("triton", "triton"), ("flash-attn", "flash_attn"), ("flash-attn3", "flash_attn_interface"),
                      ("xformers", "xformers")):
        print(f"{name:11s} {_version(mod)}")
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
    (default: every registered one)."""
    feats = sorted(ALL_MASK_FEATURES)
    head = ["backend", "devices", "dtypes", "max head dim", *feats, "packed THD", "GQA", "LSE", "Dv != D",
            "autograd"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    yes = lambda b: "yes" if b else "—"  # noqa: E731
    for name in names or [r["name"] for r in list_backends()]:
        c = get_backend(name).capabilities
        grad_on = sorted(d for d in c.devices if c.autograd_on(d))
        grad = "yes" if len(grad_on) == len(c.devices) else (f"{', '.join(grad_on)} only" if grad_on else "—")
        cells = [name, ", ".join(sorted(c.devices)), ", ".join(sorted(dtype_name(d) for d in c.dtypes)),
                 str(c.max_head_dim or "any"), *[yes(f in c.masks) for f in feats], yes(c.packed), yes(c.gqa),
                 yes(c.lse), yes(c.head_dim_v_differs), grad]
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


class UsageError(Exception):
    """A bad ``attnlib check`` argument: printed as one line, exit status 2."""


def _check_plan(args):
    """Validate the arguments: ``(device, names, unavailable, dtypes, cases)`` or ``UsageError``."""
    from .registry import canonical_name

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cpu", "cuda"):
        raise UsageError(f"--device {dev!r}: use cpu or cuda")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; use --device cpu")
    rows = {r["name"]: r for r in list_backends()}
    if args.backend:
        names = []
        for n in args.backend:
            try:
                c = canonical_name(n)
            except ValueError as e:
                raise UsageError(f"--backend: {e}") from None
            if c == "auto":
                raise UsageError("--backend auto: name the backends to check (or leave --backend out for all)")
            if c not in names:
                names.append(c)
        unavailable = [rows[n] for n in names if not rows[n]["available"]]
        names = [n for n in names if rows[n]["available"]]
    else:
        names = [n for n, r in rows.items() if r["available"]]
        unavailable = []
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
    t0 = time.perf_counter()
    print(f"attnlib check: {len(names)} backend(s) x {len(cases)} cases x {len(dtypes)} dtypes x GQA "
          f"{list(conformance.HEADS)} on {dev}, vs float64 math (tolerance: attnlib.testing)")
    print()
    failures, ran = 0, 0
    header = f"{'case':24s} {'mask':15s} {'dtype':5s} " + " ".join(f"{n:>18s}" for n in names)
    print(header)
    print("-" * len(header))
    for case in cases:
        for dtype in dtypes:
            cells = []
            for name in names:
                text, bad, skip = _cell(args, name, case, dtype, dev)
                cells.append(text)
                failures += bad
                ran += not text.strip().startswith(("n/a", "--full"))
                if args.verbose and skip:
                    print(f"    [{name} skips {case.name}: {skip}]")
            print(f"{case.name:24s} {case.kind:15s} {dtype_name(dtype):5s} " + " ".join(cells))
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
    if ran == 0:
        print("\nFAILED: no comparison ran (no backend could serve the cases and dtypes asked for)")
        return 1
    dt = time.perf_counter() - t0
    print()
    print(f"{'FAILED' if failures else 'PASSED'}: {failures} failing comparison(s), {ran} cells checked, {dt:.1f}s")
    return 1 if failures else 0


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
    c.add_argument("--full", action="store_true", help="every dtype on compiled/interpreted backends too (slow on cpu)")
    c.add_argument("--skip-section", action="append", metavar="NAME",
                   help="leave out a section contributed by a package (repeatable; e.g. models)")
    c.add_argument("--no-models", action="store_true", help="same as --skip-section models")
    c.add_argument("--fuzz", type=int, default=8, metavar="N",
                   help="also run N random cases (tile-edge lengths, head dims 8..128, every structured mask; "
                        "default 8, 0 for none)")
    c.add_argument("--seed", type=int, default=0, help="seed of the --fuzz cases (default 0)")
    c.add_argument("-v", "--verbose", action="store_true", help="print why a backend skips a case")
    args = p.parse_args(argv)
    if args.cmd == "info":
        tables = [(args.capabilities, capability_matrix), (args.aliases, alias_table),
                  (args.env, settings.markdown_table)]
        if any(asked for asked, _ in tables):
            print("\n\n".join(make() for asked, make in tables if asked))
            return 0
        return cmd_info(args)
    args.dtype = args.dtype or ["fp32", "bf16", "fp16"]
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
