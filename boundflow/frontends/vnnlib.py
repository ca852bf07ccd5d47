"""A strict reader for VNN-COMP VNNLIB property files.

A VNNLIB file declares input variables ``X_0 .. X_{n-1}`` and output variables
``Y_0 .. Y_{m-1}`` (all ``Real``) and asserts constraints over them. Following VNN-COMP, the
asserted formula describes a *counterexample*: the property holds iff no input in the input
region reaches an output in the asserted output set (the "unsafe set").

What is understood:

- commands ``(declare-const X_i Real)``, ``(declare-const Y_j Real)`` and ``(assert F)``;
  ``check-sat``, ``get-model``, ``exit``, ``set-logic`` and ``set-info`` are accepted and
  ignored; any other command is an error;
- formulas built from ``and``, ``or`` and the comparisons ``<=``, ``>=``, ``<``, ``>`` (chains
  like ``(<= a b c)`` included) over linear terms: numbers (decimal or scientific, signed),
  variables, ``(+ ...)``, ``(- ...)`` (unary negation too) and ``(* ...)`` with at most one
  non-constant factor;
- the top-level asserts are ANDed. Their disjunctive normal form must factor into
  ``(union of input boxes) x (union of output polytopes)``. That covers the VNN-COMP shapes:
  per-variable bounds, ``(assert (or (and box) (and box)))`` over the inputs (ACAS Xu
  property 6), an OR of ANDs over the outputs, and one clause that mixes a box with output
  constraints. Anything else is refused with "not supported yet".

Input constraints must bound one variable each; the result is one or more boxes, each
bounding every input from both sides. Output constraints are normalised to ``c . y <= d``
(strict inequalities are read as non-strict: the closed set contains the open one, which
keeps "unreachable" proofs sound). Everything malformed raises
:class:`~boundflow.errors.SpecError` whose message starts with ``path:line:``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from boundflow.errors import SpecError

__all__ = [
    "VnnlibProperty",
    "read_vnnlib",
    "parse_vnnlib",
    "format_row",
    "outward_float32",
]

# Upper limit on the number of clauses of the disjunctive normal form; a property beyond it
# is refused instead of exhausting memory.
MAX_CLAUSES = 100_000

_IGNORED_COMMANDS = ("check-sat", "get-model", "exit", "set-logic", "set-info")
_COMPARISONS = ("<=", ">=", "<", ">")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_VARIABLE = re.compile(r"([XY])_(0|[1-9]\d*)\Z")
_TOKEN = re.compile(r"\s+|;[^\n]*|\(|\)|[^\s();]+")


# --------------------------------------------------------------------------- result


@dataclass
class VnnlibProperty:
    """A parsed property: input boxes and the output unsafe set.

    ``boxes``: list of ``(lower, upper)``, float64 arrays of length ``num_inputs`` (X_i is
    flat index i of the model input, row-major). The input region is their union.

    ``disjuncts``: list of ``(C, d)`` with ``C`` of shape ``(k, num_outputs)`` and ``d`` of
    shape ``(k,)``: the unsafe set is the union over disjuncts of ``{y : C y <= d}``. The
    property holds iff that set is unreachable from every box.
    """

    path: str
    num_inputs: int
    num_outputs: int
    boxes: list[tuple[np.ndarray, np.ndarray]]
    disjuncts: list[tuple[np.ndarray, np.ndarray]]

    def _stack(self) -> tuple[np.ndarray, np.ndarray, list[str], list[list[int]]]:
        """Unique rows over all disjuncts, their thresholds and labels, and for each disjunct
        the indices of its rows."""
        index: dict[tuple, int] = {}
        rows: list[np.ndarray] = []
        thresholds: list[float] = []
        members: list[list[int]] = []
        for C, d in self.disjuncts:
            mine = []
            for c, t in zip(C, d):
                key = (c.tobytes(), float(t))
                if key not in index:
                    index[key] = len(rows)
                    rows.append(c)
                    thresholds.append(float(t))
                mine.append(index[key])
            members.append(mine)
        C_all = np.stack(rows) if rows else np.zeros((0, self.num_outputs), dtype=np.float64)
        labels = [format_row(c) for c in C_all]
        return C_all, np.asarray(thresholds, dtype=np.float64), labels, members

    def spec_matrix(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The unique rows of all disjuncts, stacked: ``(C_all (m, num_outputs), d (m,), labels)``.

        A row ``c`` with threshold ``t`` stands for the constraint ``c . y <= t``; a lower
        bound of ``c . y`` above ``t`` shows the constraint cannot be met.
        """
        C_all, d, labels, _ = self._stack()
        return C_all, d, labels

    def disjunct_rows(self) -> list[list[int]]:
        """For each disjunct, the indices of its rows in :meth:`spec_matrix`."""
        return self._stack()[3]

    def disjunct_unreachable(self, lower_bounds) -> list[bool]:
        """Given lower bounds of ``C_all @ y`` (length m) valid over a box, which disjuncts are
        provably unreachable (some row's lower bound exceeds its threshold)."""
        lb = np.asarray(lower_bounds, dtype=np.float64).reshape(-1)
        C_all, d, _, members = self._stack()
        if lb.shape[0] != C_all.shape[0]:
            raise ValueError(f"expected {C_all.shape[0]} lower bounds, got {lb.shape[0]}")
        return [any(lb[i] > d[i] for i in rows) for rows in members]


def format_row(c) -> str:
    """Human label of a linear form over the outputs, e.g. ``Y_0 - Y_3`` or ``2*Y_1 - 0.5*Y_2``.

    Positive terms come first, so ``e_8 - e_0`` reads ``Y_8 - Y_0``.
    """
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    nz = [int(i) for i in np.flatnonzero(c)]
    if not nz:
        return "0"
    terms = [i for i in nz if c[i] > 0] + [i for i in nz if c[i] < 0]
    out = []
    for k, i in enumerate(terms):
        v = float(c[i])
        mag = abs(v)
        body = f"Y_{i}" if mag == 1.0 else f"{mag:g}*Y_{i}"
        if k == 0:
            out.append(body if v > 0 else f"-{body}")
        else:
            out.append(f"{'+' if v > 0 else '-'} {body}")
    return " ".join(out)


def outward_float32(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """Round a float64 box to float32 without shrinking it: lower down, upper up."""
    lo64 = np.asarray(lower, dtype=np.float64)
    hi64 = np.asarray(upper, dtype=np.float64)
    lo = lo64.astype(np.float32)
    hi = hi64.astype(np.float32)
    lo = np.where(lo.astype(np.float64) > lo64, np.nextafter(lo, np.float32(-np.inf)), lo)
    hi = np.where(hi.astype(np.float64) < hi64, np.nextafter(hi, np.float32(np.inf)), hi)
    return lo.astype(np.float32), hi.astype(np.float32)


# --------------------------------------------------------------------------- reading


def read_vnnlib(path, num_inputs: int | None = None, num_outputs: int | None = None) -> VnnlibProperty:
    """Read a VNNLIB file. ``num_inputs`` / ``num_outputs``, when given, must match the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"{p}: no such VNNLIB file") from None
    except IsADirectoryError:
        raise SpecError(f"{p}: is a directory, not a VNNLIB file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not a text file ({e.reason})") from None
    return parse_vnnlib(text, source=str(p), num_inputs=num_inputs, num_outputs=num_outputs)


def parse_vnnlib(
    text: str, source: str = "<string>", num_inputs: int | None = None, num_outputs: int | None = None
) -> VnnlibProperty:
    """Parse VNNLIB text; ``source`` names it in error messages."""
    return _Parser(text, source).run(num_inputs, num_outputs)


# S-expression nodes: a symbol is _Sym, a list is _List; both remember their line.


class _Sym(str):
    line: int


class _List(list):
    line: int


def _sym(text: str, line: int) -> _Sym:
    s = _Sym(text)
    s.line = line
    return s


# A linear expression: ({("X"|"Y", index): coeff}, constant).
_Lin = tuple[dict[tuple[str, int], float], float]


@dataclass
class _Atom:
    coeffs: dict[tuple[str, int], float]  # sum coeffs * vars <= bound
    bound: float
    line: int


class _Parser:
    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source
        self.declared: dict[tuple[str, int], int] = {}  # var -> line of declaration

    def error(self, line: int, msg: str) -> SpecError:
        return SpecError(f"{self.source}:{line}: {msg}")

    # ---- tokens and S-expressions

    def read_forms(self) -> list[_List]:
        stack: list[_List] = []
        forms: list[_List] = []
        line = 1
        for m in _TOKEN.finditer(self.text):
            tok = m.group()
            if tok[0].isspace() or tok[0] == ";":
                line += tok.count("\n")
                continue
            if tok == "(":
                node = _List()
                node.line = line
                stack.append(node)
            elif tok == ")":
                if not stack:
                    raise self.error(line, "unbalanced parentheses: ')' without a matching '('")
                node = stack.pop()
                if stack:
                    stack[-1].append(node)
                else:
                    forms.append(node)
            else:
                if not stack:
                    raise self.error(line, f"unexpected {tok!r} outside parentheses")
                stack[-1].append(_sym(tok, line))
        if stack:
            raise self.error(
                stack[-1].line, "unbalanced parentheses: '(' opened here is never closed"
            )
        return forms

    # ---- terms

    def var(self, tok: _Sym) -> tuple[str, int] | None:
        m = _VARIABLE.match(tok)
        if not m:
            return None
        return (m.group(1), int(m.group(2)))

    def term(self, node) -> _Lin:
        if isinstance(node, _Sym):
            if _NUMBER.match(node):
                v = float(node)
                if not math.isfinite(v):
                    raise self.error(node.line, f"number {node!s} is out of range")
                return {}, v
            v = self.var(node)
            if v is not None:
                if v not in self.declared:
                    raise self.error(node.line, f"undeclared variable {node!s}")
                return {v: 1.0}, 0.0
            if node in ("X", "Y") or re.match(r"[A-Za-z_]", node):
                raise self.error(node.line, f"undeclared variable {node!s}")
            raise self.error(node.line, f"cannot read term {node!s}")
        if not node:
            raise self.error(node.line, "empty term '()'")
        head = node[0]
        if not isinstance(head, _Sym):
            raise self.error(node.line, "a term must start with an operator")
        args = [self.term(a) for a in node[1:]]
        if head == "+":
            if not args:
                raise self.error(node.line, "'+' needs at least one argument")
            return _lin_sum(args, [1.0] * len(args))
        if head == "-":
            if not args:
                raise self.error(node.line, "'-' needs at least one argument")
            if len(args) == 1:
                return _lin_scale(args[0], -1.0)
            return _lin_sum(args, [1.0] + [-1.0] * (len(args) - 1))
        if head == "*":
            if not args:
                raise self.error(node.line, "'*' needs at least one argument")
            variable = [a for a in args if a[0]]
            if len(variable) > 1:
                raise self.error(
                    node.line, "non-linear term: a product of more than one variable"
                )
            factor = 1.0
            for a in args:
                if not a[0]:
                    factor *= a[1]
            if variable:
                return _lin_scale(variable[0], factor)
            return {}, factor
        if head in _COMPARISONS or head in ("and", "or"):
            raise self.error(node.line, f"'{head}' is a formula, expected a term")
        raise self.error(node.line, f"unsupported operator '{head}' in a term")

    # ---- formulas -> DNF (list of clauses, a clause is a list of atoms)

    def dnf(self, node) -> list[list[_Atom]]:
        if isinstance(node, _Sym):
            raise self.error(node.line, f"expected a formula, got {node!s}")
        if not node or not isinstance(node[0], _Sym):
            raise self.error(node.line, "expected a formula (and / or / comparison)")
        head = node[0]
        if head == "and":
            if len(node) < 2:
                raise self.error(node.line, "'and' with no arguments")
            return self.conjoin([self.dnf(a) for a in node[1:]], node.line)
        if head == "or":
            if len(node) < 2:
                raise self.error(node.line, "'or' with no arguments")
            clauses = [c for a in node[1:] for c in self.dnf(a)]
            if len(clauses) > MAX_CLAUSES:
                raise self.error(node.line, f"formula expands to more than {MAX_CLAUSES} clauses")
            return clauses
        if head in _COMPARISONS:
            if len(node) < 3:
                raise self.error(node.line, f"'{head}' needs at least two arguments")
            terms = [self.term(a) for a in node[1:]]
            atoms = []
            for a, b in zip(terms, terms[1:]):
                # a <= b  ->  a - b <= 0 ;  a >= b  ->  b - a <= 0
                lhs = _lin_sum([a, b], [1.0, -1.0] if head in ("<=", "<") else [-1.0, 1.0])
                coeffs = {k: v for k, v in lhs[0].items() if v != 0.0}
                if not coeffs:
                    raise self.error(node.line, "comparison between constants (no variable)")
                atoms.append(_Atom(coeffs, 0.0 - lhs[1], node.line))
            return [atoms]
        if head in ("not", "=>", "=", "distinct", "xor", "ite"):
            raise self.error(node.line, f"'{head}' is not supported in VNNLIB properties")
        raise self.error(node.line, f"unknown operator '{head}' in a formula")

    def conjoin(self, dnfs: list[list[list[_Atom]]], line: int) -> list[list[_Atom]]:
        total = 1
        for d in dnfs:
            total *= len(d)
        if total > MAX_CLAUSES:
            raise self.error(line, f"formula expands to more than {MAX_CLAUSES} clauses")
        return [[a for clause in combo for a in clause] for combo in product(*dnfs)]

    # ---- commands

    def declare(self, form: _List) -> None:
        if len(form) != 3 or not all(isinstance(t, _Sym) for t in form[1:]):
            raise self.error(form.line, "expected (declare-const NAME Real)")
        name, sort = form[1], form[2]
        v = self.var(name)
        if v is None:
            raise self.error(
                form.line, f"variable {name!s}: only X_i (inputs) and Y_j (outputs) are supported"
            )
        if sort != "Real":
            raise self.error(form.line, f"variable {name!s}: sort {sort!s} is not supported (Real only)")
        if v in self.declared:
            raise self.error(
                form.line, f"variable {name!s} declared twice (first on line {self.declared[v]})"
            )
        self.declared[v] = form.line

    def count(self, kind: str, expected: int | None) -> int:
        idx = sorted(i for k, i in self.declared if k == kind)
        what = "input" if kind == "X" else "output"
        if not idx:
            raise self.error(1, f"no {what} variables {kind}_0 ... declared")
        if idx[-1] != len(idx) - 1:
            missing = next(i for i, j in enumerate(idx) if i != j)
            raise self.error(
                self.declared[(kind, idx[-1])],
                f"{kind}_{idx[-1]} declared but {kind}_{missing} is not: {what}s must be "
                f"{kind}_0 ... {kind}_{idx[-1]}",
            )
        n = len(idx)
        if expected is not None and n != expected:
            raise SpecError(
                f"{self.source}: declares {n} {what}s ({kind}_0 ... {kind}_{n - 1}) "
                f"but the model has {expected}"
            )
        return n

    def run(self, num_inputs: int | None, num_outputs: int | None) -> VnnlibProperty:
        forms = self.read_forms()
        common: list[_Atom] = []  # asserts that are one clause
        alternatives: list[tuple[int, list[list[_Atom]]]] = []  # asserts with several clauses
        for form in forms:
            if not form or not isinstance(form[0], _Sym):
                raise self.error(form.line, "expected a command, e.g. (assert ...)")
            cmd = form[0]
            if cmd == "declare-const":
                self.declare(form)
            elif cmd == "assert":
                if len(form) != 2:
                    raise self.error(form.line, "assert takes exactly one formula")
                clauses = self.dnf(form[1])
                if len(clauses) == 1:
                    common.extend(clauses[0])
                else:
                    alternatives.append((form.line, clauses))
            elif cmd in _IGNORED_COMMANDS:
                continue
            else:
                raise self.error(form.line, f"unknown command '{cmd}'")
        n_in = self.count("X", num_inputs)
        n_out = self.count("Y", num_outputs)

        # Every atom must be over inputs only or outputs only.
        for atom in common + [a for _, cl in alternatives for c in cl for a in c]:
            kinds = {k for k, _ in atom.coeffs}
            if len(kinds) > 1:
                raise self.error(
                    atom.line,
                    "a constraint mixing input (X) and output (Y) variables is not supported yet",
                )

        base_in = [a for a in common if _is_input(a)]
        base_out = [a for a in common if not _is_input(a)]
        base_box = self.box_constraints(base_in)

        # The remaining clauses: the product of the multi-clause asserts.
        if alternatives:
            line = alternatives[0][0]
            clauses = self.conjoin([cl for _, cl in alternatives], line)
        else:
            line, clauses = 0, [[]]

        # Factor union_k (box_k x out_k) as (union of boxes) x (union of output sets).
        groups: dict[tuple, list[_Atom]] = {}  # input key -> box constraints
        outs_by_group: dict[tuple, list[frozenset]] = {}
        out_rows: dict[frozenset, tuple[np.ndarray, np.ndarray]] = {}
        for clause in clauses:
            ins = [a for a in clause if _is_input(a)]
            outs = base_out + [a for a in clause if not _is_input(a)]
            key = self.box_key(ins)
            groups.setdefault(key, ins)
            okey = frozenset(_atom_key(a) for a in outs)
            if okey not in out_rows:
                out_rows[okey] = self.output_rows(outs, n_out)
            lst = outs_by_group.setdefault(key, [])
            if okey not in lst:
                lst.append(okey)
        out_sets = list(outs_by_group.values())
        if any(set(o) != set(out_sets[0]) for o in out_sets[1:]):
            raise self.error(
                line,
                "an OR whose clauses pair different input boxes with different output "
                "constraints is not supported yet",
            )

        boxes = []
        for ins in groups.values():
            boxes.append(self.make_box(base_box, self.box_constraints(ins), n_in))
        disjuncts = [out_rows[k] for k in out_sets[0]]
        if any(len(d) == 0 for _, d in disjuncts):
            raise SpecError(
                f"{self.source}: no output constraint asserted (in some clause): the unsafe "
                "set would be every output, so there is nothing to verify"
            )
        return VnnlibProperty(
            path=self.source,
            num_inputs=n_in,
            num_outputs=n_out,
            boxes=boxes,
            disjuncts=disjuncts,
        )

    # ---- input boxes

    def box_constraints(self, atoms: list[_Atom]) -> dict[int, list]:
        """{index: [lower, lower_line, upper, upper_line]} from single-variable atoms."""
        out: dict[int, list] = {}
        for a in atoms:
            if len(a.coeffs) != 1:
                raise self.error(
                    a.line,
                    "a linear constraint over several inputs is not supported yet "
                    "(inputs must be bounded one variable at a time)",
                )
            ((_, i), c), = a.coeffs.items()
            v = a.bound / c
            entry = out.setdefault(i, [-math.inf, 0, math.inf, 0])
            if c > 0:  # x <= v
                if v < entry[2]:
                    entry[2], entry[3] = v, a.line
            else:  # x >= v
                if v > entry[0]:
                    entry[0], entry[1] = v, a.line
        return out

    def box_key(self, atoms: list[_Atom]) -> tuple:
        b = self.box_constraints(atoms)
        return tuple(sorted((i, e[0], e[2]) for i, e in b.items()))

    def make_box(self, base: dict, extra: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
        lower = np.empty(n, dtype=np.float64)
        upper = np.empty(n, dtype=np.float64)
        for i in range(n):
            lo, lo_line, hi, hi_line = base.get(i, [-math.inf, 0, math.inf, 0])
            if i in extra:
                e = extra[i]
                if e[0] > lo:
                    lo, lo_line = e[0], e[1]
                if e[2] < hi:
                    hi, hi_line = e[2], e[3]
            decl = self.declared[("X", i)]
            if lo == -math.inf:
                raise self.error(decl, f"input X_{i} has no lower bound")
            if hi == math.inf:
                raise self.error(decl, f"input X_{i} has no upper bound")
            if lo > hi:
                raise self.error(
                    max(lo_line, hi_line),
                    f"empty box: X_{i} >= {lo!r} (line {lo_line}) and X_{i} <= {hi!r} "
                    f"(line {hi_line})",
                )
            lower[i], upper[i] = lo, hi
        return lower, upper

    # ---- output rows

    def output_rows(self, atoms: list[_Atom], n_out: int) -> tuple[np.ndarray, np.ndarray]:
        C = np.zeros((len(atoms), n_out), dtype=np.float64)
        d = np.empty(len(atoms), dtype=np.float64)
        for r, a in enumerate(atoms):
            for (_, j), c in a.coeffs.items():
                C[r, j] = c
            d[r] = a.bound
        return C, d


def _is_input(a: _Atom) -> bool:
    return next(iter(a.coeffs))[0] == "X"


def _atom_key(a: _Atom) -> tuple:
    return (tuple(sorted(a.coeffs.items())), a.bound)


def _lin_scale(a: _Lin, s: float) -> _Lin:
    return {k: v * s for k, v in a[0].items()}, a[1] * s


def _lin_sum(args: list[_Lin], signs: list[float]) -> _Lin:
    coeffs: dict[tuple[str, int], float] = {}
    const = 0.0
    for (c, k), s in zip(args, signs):
        for var, v in c.items():
            coeffs[var] = coeffs.get(var, 0.0) + s * v
        const += s * k
    return coeffs, const
