"""Command-line interface: ``boundflow bounds ...`` (also ``python -m boundflow``).

Every error a user can cause (a missing or malformed file, a region of the wrong shape, an
empty box, an unsupported model) prints one line ``boundflow: error: <message>`` to stderr
and exits with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from boundflow import api
from boundflow.errors import BoundflowError
from boundflow.frontends.vnnlib import format_row, read_vnnlib

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")

EXIT_ERROR = 2


class CliError(Exception):
    """A user error found by the CLI itself (bad arguments, unreadable region or spec)."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # report usage errors like every other error
        self.print_usage(sys.stderr)
        raise CliError(message)


# --------------------------------------------------------------------------- arguments

_BOUNDS_EPILOG = """\
input region (exactly one of):
  --vnnlib PROP      the property's input box(es); the bounds are on the rows of its output
                     constraints (each row c with threshold d stands for "c . y <= d", a
                     condition of the unsafe set). Several boxes (an OR over the inputs) are
                     bounded together, one region each.
  --center X --eps E the L-inf ball [X - E, X + E], optionally clipped to
                     [--clip-min, --clip-max]. X is a .npy array of the model's input shape,
                     with or without a leading batch dimension of 1, or flat.
  --box BOX.json     {"lower": [...], "upper": [...]}, flat or nested lists (row-major).

Boxes are rounded outward to float32 (lower down, upper up), and a spec row float32 cannot
hold exactly is corrected with bounds on the outputs, so the bounds hold for the region and rows
as written. They are computed in float32; --sound-fp computes them in float64 with every
rounding error bounded, so that they hold in floating point too (the box as written, exactly).

examples:
  boundflow bounds model.onnx --vnnlib prop.vnnlib --method crown
  boundflow bounds model.onnx --center x.npy --eps 0.01 --clip-min 0 --clip-max 1 --method ibp
  boundflow bounds model.onnx --box box.json --spec C.json --method crown-ibp --json
  boundflow bounds model.onnx --vnnlib prop.vnnlib --sound-fp
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="boundflow",
        description="BoundFlow: certified bounds on neural-network outputs "
        "(IBP, CROWN, CROWN-IBP).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    b = sub.add_parser(
        "bounds",
        help="certified lower/upper bounds on a model's outputs over an input region",
        description="Compute certified lower and upper bounds on the outputs of an ONNX model\n"
        "(or on C @ outputs) over an input region: for every point of the region the\n"
        "outputs lie inside the printed bounds.",
        epilog=_BOUNDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("model", metavar="MODEL.onnx", help="the network, an ONNX file")
    region = b.add_mutually_exclusive_group(required=True)
    region.add_argument(
        "--vnnlib", metavar="PROP.vnnlib",
        help="VNN-COMP property: input box(es) and the output rows to bound",
    )
    region.add_argument(
        "--center", metavar="X.npy",
        help="centre of an L-inf ball (.npy, the model's input shape); needs --eps",
    )
    region.add_argument(
        "--box", metavar="BOX.json",
        help='explicit box: JSON {"lower": [...], "upper": [...]}, flat or nested lists',
    )
    b.add_argument("--eps", type=float, metavar="E", help="radius of the L-inf ball (>= 0), with --center")
    b.add_argument("--clip-min", type=float, metavar="V", help="clip the ball's lower side at V (with --center)")
    b.add_argument("--clip-max", type=float, metavar="V", help="clip the ball's upper side at V (with --center)")
    b.add_argument(
        "--spec", metavar="C.json",
        help='bound C @ f(x) instead of f(x): JSON matrix [[...], ...] or {"C": [[...], ...]} '
        "with one column per model output (not with --vnnlib, whose rows are used)",
    )
    b.add_argument(
        "--method", choices=METHODS, default="crown",
        help="bound propagation method (default: %(default)s)",
    )
    b.add_argument(
        "--json", action="store_true",
        help='print {"lb": [...], "ub": [...], "method": ..., "stats": {...}} instead of a table '
        "(lb/ub are lists of lists, one per box, when a VNNLIB property has several boxes)",
    )
    b.add_argument(
        "--sound-fp", action="store_true",
        help="bounds sound in floating point, not only in real arithmetic (float64, every rounding "
        "error bounded; python executor only)",
    )
    b.add_argument(
        "--executor", choices=("python", "tvm"), default="python",
        help='run the plan with torch kernels (python, default) or TVM-compiled tasks (tvm; needs '
        'pip install -e ".[tvm]"; the first run of a model compiles it)',
    )
    add_device_argument(b)
    b.set_defaults(run=cmd_bounds)
    from boundflow.verify.commands import add_commands  # verify, run-suite

    add_commands(sub)
    return parser


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="DEVICE",
        help="where the bounds are computed: auto (CUDA when torch sees a GPU, else the CPU; the "
        "default), cpu, cuda or cuda:N",
    )


# --------------------------------------------------------------------------- loading


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what} {path}: no such file")
    if not p.is_file():
        raise CliError(f"{what} {path}: not a file")
    return p


def _fit_shape(arr: np.ndarray, shape: tuple[int, ...], source: str) -> np.ndarray:
    """Flatten ``arr`` if it has the input shape (with or without a batch 1, or flat)."""
    numel = math.prod(shape)
    if arr.shape in (tuple(shape), (1, *shape), (numel,)):
        return arr.reshape(-1)
    raise CliError(
        f"{source}: has shape {list(arr.shape)}, expected the model's input shape "
        f"{list(shape)} (or with a leading batch 1, or {numel} values flat)"
    )


def _as_array(value, source: str, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise CliError(f"{source}: {what} must be a (nested) list of numbers") from None
    if not np.all(np.isfinite(arr)):
        raise CliError(f"{source}: {what} contains a non-finite value (nan or inf)")
    return arr


def _read_json(path: str, what: str):
    p = _existing_file(path, what)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"{what} {path}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise CliError(f"{what} {path}: not a text file") from None


def _check_box(lower: np.ndarray, upper: np.ndarray, source: str) -> None:
    bad = np.flatnonzero(lower > upper)
    if bad.size:
        i = int(bad[0])
        raise CliError(
            f"{source}: empty box: lower > upper at {bad.size} position(s), first at flat "
            f"index {i} ({lower[i]!r} > {upper[i]!r})"
        )


def load_box_json(path: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    data = _read_json(path, "box")
    if not isinstance(data, dict) or "lower" not in data or "upper" not in data:
        raise CliError(f'box {path}: expected a JSON object {{"lower": [...], "upper": [...]}}')
    lower = _fit_shape(_as_array(data["lower"], path, '"lower"'), shape, f'{path} "lower"')
    upper = _fit_shape(_as_array(data["upper"], path, '"upper"'), shape, f'{path} "upper"')
    _check_box(lower, upper, path)
    return lower, upper


def load_ball(args, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    p = _existing_file(args.center, "centre")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise CliError(f"centre {args.center}: not a readable .npy array ({e})") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise CliError(f"centre {args.center}: expected a numeric array")
    x = _fit_shape(_as_array(x, args.center, "the centre"), shape, args.center)
    if args.eps is None:
        raise CliError("--center needs --eps")
    if not (math.isfinite(args.eps) and args.eps >= 0):
        raise CliError(f"--eps must be a finite number >= 0, got {args.eps}")
    lower, upper = x - args.eps, x + args.eps
    if args.clip_min is not None:
        lower = np.maximum(lower, args.clip_min)
    if args.clip_max is not None:
        upper = np.minimum(upper, args.clip_max)
    if args.clip_min is not None and args.clip_max is not None and args.clip_min > args.clip_max:
        raise CliError(f"--clip-min {args.clip_min} > --clip-max {args.clip_max}")
    _check_box(lower, upper, f"ball around {args.center} after clipping")
    return lower, upper


def load_spec_json(path: str, num_outputs: int) -> np.ndarray:
    data = _read_json(path, "spec")
    if isinstance(data, dict):
        if "C" not in data:
            raise CliError(f'spec {path}: expected a matrix [[...], ...] or {{"C": [[...], ...]}}')
        data = data["C"]
    C = _as_array(data, path, "the spec matrix")
    if C.ndim != 2 or C.shape[0] == 0:
        raise CliError(f"spec {path}: expected a non-empty matrix [[...], ...], got shape {list(C.shape)}")
    if C.shape[1] != num_outputs:
        raise CliError(
            f"spec {path}: has {C.shape[1]} columns but the model has {num_outputs} outputs"
        )
    return C


# --------------------------------------------------------------------------- output


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for k, r in enumerate([headers] + rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def _ms(v) -> str:
    return f"{v:.2f} ms" if isinstance(v, (int, float)) else "?"


def stats_line(stats: dict) -> str:
    return (
        f"stats: plan {_ms(stats.get('plan_ms'))}, run {_ms(stats.get('run_ms'))}, "
        f"{stats.get('num_tasks', '?')} tasks, logical {_bytes(stats.get('logical_bytes'))}, "
        f"physical {_bytes(stats.get('physical_bytes'))}"
    )


def _jsonable(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if hasattr(o, "tolist"):  # numpy arrays, torch tensors
        return o.tolist()
    return str(o)


# --------------------------------------------------------------------------- bounds


def cmd_bounds(args) -> int:
    if args.center is None and any(
        v is not None for v in (args.eps, args.clip_min, args.clip_max)
    ):
        raise CliError("--eps, --clip-min and --clip-max only go with --center")
    if args.vnnlib is not None and args.spec is not None:
        raise CliError("--spec cannot be combined with --vnnlib (the property's rows are bounded)")

    model = str(_existing_file(args.model, "model"))
    shape = tuple(int(d) for d in api.input_shape(model))
    num_outputs = int(api.num_outputs(model))

    prop = None
    thresholds = None
    C = None
    if args.vnnlib is not None:
        _existing_file(args.vnnlib, "property")
        prop = read_vnnlib(args.vnnlib, num_inputs=math.prod(shape), num_outputs=num_outputs)
        boxes = prop.boxes
        C, thresholds, labels = prop.spec_matrix()
        region = f"vnnlib {args.vnnlib}"
    elif args.center is not None:
        boxes = [load_ball(args, shape)]
        clip = ""
        if args.clip_min is not None or args.clip_max is not None:
            clip = f", clipped to [{args.clip_min}, {args.clip_max}]"
        region = f"L-inf ball, eps {args.eps} around {args.center}{clip}"
    else:
        boxes = [load_box_json(args.box, shape)]
        region = f"box {args.box}"
    if args.spec is not None:
        C = load_spec_json(args.spec, num_outputs)
    if C is None:
        labels = [f"Y_{j}" for j in range(num_outputs)]
    elif prop is None:
        labels = [format_row(c) for c in C]

    # float64, as written: the bound rounds them outward (float32) or takes them exactly (--sound-fp)
    x_lower = torch.from_numpy(np.stack([lo for lo, _ in boxes]).astype(np.float64)).reshape(len(boxes), *shape)
    x_upper = torch.from_numpy(np.stack([hi for _, hi in boxes]).astype(np.float64)).reshape(len(boxes), *shape)
    C_t = None if C is None else torch.as_tensor(C, dtype=torch.float64)

    res = api.bound(model, x_lower, x_upper, method=args.method, C=C_t, executor=args.executor,
                    sound_fp=args.sound_fp, device=args.device)
    lb = res.lb.detach().to(torch.float64).reshape(len(boxes), -1).numpy()
    ub = res.ub.detach().to(torch.float64).reshape(len(boxes), -1).numpy()
    if lb.shape[1] != len(labels):  # a bug, not a user error: let it show a traceback
        raise RuntimeError(f"got {lb.shape[1]} bounds per region, expected {len(labels)}")

    if args.json:
        out = {
            "lb": lb[0].tolist() if len(boxes) == 1 else lb.tolist(),
            "ub": ub[0].tolist() if len(boxes) == 1 else ub.tolist(),
            "method": res.method,
            "stats": res.stats,
        }
        print(json.dumps(out, default=_jsonable))
        return 0

    lines = [
        f"model:  {args.model} (input {list(shape)}, {num_outputs} outputs)",
        f"region: {region}" + (f" ({len(boxes)} boxes)" if len(boxes) > 1 else ""),
        f"method: {res.method}",
    ]
    for b in range(len(boxes)):
        lines.append("")
        if len(boxes) > 1:
            lines.append(f"box {b + 1} of {len(boxes)}:")
        headers = ["row", "lower", "upper", "width"]
        if thresholds is not None:
            headers.append("unsafe if row <=")
        rows = []
        for i, label in enumerate(labels):
            r = [label, _fmt(lb[b, i]), _fmt(ub[b, i]), _fmt(ub[b, i] - lb[b, i])]
            if thresholds is not None:
                r.append(_fmt(thresholds[i]))
            rows.append(r)
        lines += _table(headers, rows)
        if prop is not None:
            lines += _hint(prop, lb[b], labels, thresholds, args.sound_fp)
    lines.append("")
    lines.append(stats_line(res.stats))
    print("\n".join(lines))
    return 0


def _hint(prop, lb_row: np.ndarray, labels: list[str], thresholds: np.ndarray, sound_fp: bool) -> list[str]:
    """Per disjunct of the unsafe set: do these bounds alone show it unreachable?"""
    unreachable = prop.disjunct_unreachable(lb_row)
    out = ["", "hint (from these bounds alone, not a verdict): unsafe-set disjuncts"]
    for k, (rows, done) in enumerate(zip(prop.disjunct_rows(), unreachable)):
        cond = " and ".join(f"{labels[i]} <= {_fmt(thresholds[i])}" for i in rows)
        if done:
            i = next(i for i in rows if lb_row[i] > thresholds[i])
            why = f"unreachable: lower bound of {labels[i]} is {_fmt(lb_row[i])} > {_fmt(thresholds[i])}"
        else:
            why = "not shown unreachable by these bounds"
        out.append(f"  {k + 1}. {cond}: {why}")
    if all(unreachable):
        out.append("  every disjunct is unreachable over this box: the bounds prove the property here"
                   + ("" if sound_fp else " (in real arithmetic; --sound-fp also bounds the rounding)"))
    return out


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None, *, owns_process: bool = False) -> int:
    """Run one command; the exit status. ``owns_process``: this call is the whole process
    (:func:`run`), so ``verify`` may end it at its timeout."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        args.owns_process = owns_process
        return args.run(args)
    except SystemExit as e:  # --help, or argparse stopping
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    except (CliError, BoundflowError) as e:
        msg = str(e) or type(e).__name__
        print(f"boundflow: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"boundflow: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR


def run() -> None:
    """The ``boundflow`` program (also ``python -m boundflow``): :func:`main`, then exit without
    the interpreter's teardown, which takes torch and onnxruntime a second or two on a loaded
    machine (past ``verify``'s timeout, as VNN-COMP measures it)."""
    code = main(owns_process=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
