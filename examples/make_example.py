"""Build a small example for the BoundFlow CLI: a trained toy MLP and a robustness property.

    python examples/make_example.py [--out DIR]        # default: examples/generated/

Writes into DIR:
  toy_mlp.onnx     an 8 -> 16 -> 16 -> 3 ReLU MLP (ONNX opset 17, input [1, 8]) trained for a
                   few hundred steps to tell apart three toy classes
  toy_prop.vnnlib  VNN-COMP style property: in an L-inf box of radius EPS around a point of
                   class 0, Y_0 stays the largest output (the file asserts the unsafe set,
                   "Y_1 >= Y_0 or Y_2 >= Y_0", as VNN-COMP does)
  x0.npy           the centre point, shape [1, 8]
  box.json         the same box as {"lower": [...], "upper": [...]}
  spec.json        {"C": [[...], ...]}: rows Y_0 - Y_1 and Y_0 - Y_2

Everything is seeded; running it twice writes the same files.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

SEED = 0
NUM_INPUTS = 8
HIDDEN = 16
NUM_CLASSES = 3
EPS = 0.4  # IBP cannot prove the property at this radius; CROWN-IBP and CROWN can
STEPS = 300

DEFAULT_OUT = Path(__file__).resolve().parent / "generated"


def build_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Train the toy MLP; return it (eval mode) and a correctly classified class-0 point."""
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    # Toy task: three Gaussian blobs in R^8.
    centres = torch.randn(NUM_CLASSES, NUM_INPUTS, generator=g)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(200)
    data = centres[labels] + 0.5 * torch.randn(labels.numel(), NUM_INPUTS, generator=g)

    model = torch.nn.Sequential(
        torch.nn.Linear(NUM_INPUTS, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, NUM_CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), labels)
        loss.backward()
        opt.step()
    model.eval()

    with torch.no_grad():
        x0 = centres[0:1] + 0.1 * torch.randn(1, NUM_INPUTS, generator=g)
        if int(model(x0).argmax()) != 0:
            raise RuntimeError("toy model misclassifies the example point; change SEED")
    return model, x0


def export_onnx(model: torch.nn.Module, x0: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript exporter is legacy; it is what we want here
        # (no onnxscript dependency, plain Gemm/Relu graph).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x0,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
        )


def vnnlib_text(lower: np.ndarray, upper: np.ndarray, label: int = 0) -> str:
    lines = [
        f"; Toy robustness property: L-inf box of radius {EPS} around x0, label {label}.",
        "; The asserts describe a counterexample: the property holds iff they are unsatisfiable.",
        "",
    ]
    lines += [f"(declare-const X_{i} Real)" for i in range(lower.size)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(NUM_CLASSES)]
    lines += ["", "; Input constraints:"]
    for i, (lo, hi) in enumerate(zip(lower.tolist(), upper.tolist())):
        lines.append(f"(assert (<= X_{i} {hi!r}))")
        lines.append(f"(assert (>= X_{i} {lo!r}))")
    lines += ["", "; Output constraints (unsafe set: some other class scores at least as high):"]
    lines.append("(assert (or")
    for j in range(NUM_CLASSES):
        if j != label:
            lines.append(f"    (and (>= Y_{j} Y_{label}))")
    lines.append("))")
    return "\n".join(lines) + "\n"


def make_example(out_dir: str | Path = DEFAULT_OUT) -> dict[str, Path]:
    """Write the example files into ``out_dir``; return their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, x0 = build_model()
    paths = {
        "model": out / "toy_mlp.onnx",
        "vnnlib": out / "toy_prop.vnnlib",
        "center": out / "x0.npy",
        "box": out / "box.json",
        "spec": out / "spec.json",
    }
    export_onnx(model, x0, paths["model"])

    x = x0.numpy().astype(np.float64).reshape(-1)
    lower, upper = x - EPS, x + EPS
    paths["vnnlib"].write_text(vnnlib_text(lower, upper))
    np.save(paths["center"], x0.numpy().astype(np.float32))
    paths["box"].write_text(json.dumps({"lower": lower.tolist(), "upper": upper.tolist()}) + "\n")
    C = [[1.0 if k == 0 else (-1.0 if k == j else 0.0) for k in range(NUM_CLASSES)]
         for j in range(1, NUM_CLASSES)]
    paths["spec"].write_text(json.dumps({"C": C}) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    paths = make_example(args.out)
    for kind, path in paths.items():
        print(f"wrote {kind:7s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
