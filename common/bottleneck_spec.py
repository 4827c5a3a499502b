"""A bottleneck adapter artifact's description (see :mod:`common.bottleneck`), kept free of
torch so the trainer's config validation and the client commands can use it without
loading the tensor stack."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLACEMENTS = ("both", "attention", "mlp")
WEIGHTS_FILE = "bottleneck.safetensors"
CONFIG_FILE = "bottleneck_config.json"


@dataclass(frozen=True)
class BottleneckSpec:
    size: int  # width of the bottleneck
    placement: str  # "both", "attention" or "mlp"
    hidden_size: int
    num_layers: int

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("attention", "mlp") if self.placement == "both" else (self.placement,)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "bottleneck",
            "size": self.size,
            "placement": self.placement,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "activation": "silu",
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> BottleneckSpec:
        spec = cls(
            size=int(values["size"]),
            placement=str(values["placement"]),
            hidden_size=int(values["hidden_size"]),
            num_layers=int(values["num_layers"]),
        )
        if spec.placement not in PLACEMENTS or min(spec.size, spec.hidden_size) < 1:
            raise ValueError(f"bad bottleneck config {values}")
        return spec


def read_spec(folder: Path) -> BottleneckSpec:
    """The artifact's config (request path: small file only); ValueError if unusable."""
    try:
        values = json.loads((folder / CONFIG_FILE).read_text())
        return BottleneckSpec.from_json(values)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"no usable {CONFIG_FILE}: {type(exc).__name__}: {exc}") from None
