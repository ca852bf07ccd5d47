"""Reading the auto_LiRPA reference fixtures in ../shared/golden (format: its README)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FIXTURES = [
    "ACASXU_run2a_1_1_batch_2000__prop_1", "ACASXU_run2a_1_1_batch_2000__prop_3",
    "cifar_base_kw__cifar_base_kw-img2908-eps0.019869281045751634",
    "cnn_small__eps0.02", "cnn_small__eps0.1", "mlp_small__eps0.05", "mlp_small__eps0.2",
    "mnist-net_256x2__prop_0_0.03", "mnist-net_256x2__prop_0_0.03__specC",
    "mnist-net_256x2__prop_1_0.05", "mnist-net_256x2__prop_1_0.05__specC",
    "permute_net__eps0.05", "permute_net__eps0.2", "resnet_block__eps0.01", "resnet_block__eps0.05",
]


@dataclass
class Fixture:
    name: str
    model: Path
    input_shape: tuple[int, ...]
    lower: torch.Tensor
    upper: torch.Tensor
    C: torch.Tensor | None
    raw: dict

    def reference(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """auto_LiRPA's bounds for a method; None where it failed (the fixture records why)."""
        entry = self.raw["methods"].get(key) or self.raw["variants"][key]
        if "error" in entry:
            return None
        return torch.tensor(entry["lb"]), torch.tensor(entry["ub"])

    @property
    def empirical(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.raw["sanity"]
        return torch.tensor(s["empirical_min"]), torch.tensor(s["empirical_max"])


def load_fixture(shared: Path, name: str, folder: str = "golden") -> Fixture:
    """A fixture of ../shared/golden (or of `folder`, e.g. golden_ops: the same format)."""
    golden = shared / folder
    raw = json.loads((golden / f"{name}.json").read_text())
    shape = tuple(raw["input_shape"])
    as32 = lambda xs: torch.from_numpy(np.array(xs, dtype=np.float32).reshape(shape))  # noqa: E731
    C = None if raw["C"] is None else torch.tensor(raw["C"], dtype=torch.float32)
    return Fixture(name, golden / raw["model"], shape, as32(raw["x_lower"]), as32(raw["x_upper"]), C, raw)
