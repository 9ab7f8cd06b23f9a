"""How a student's learned quantities moved during training, read from its unit's marker (``trajectory``): the
hybrid gate's token weight (research.md: a gate that only drifts one way is a finding, not a balance), the
kept fraction of a learned FFN width and how far OKD's online modules moved the teacher. One table per
quantity, one row per student, one column per validation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .tables import markdown_table

# Quantity in a validation record -> what the table calls it.
TRACKED = {"gate": "token weight g of the hybrid gate", "ffn_open": "kept fraction of FFN channels (eval gates)",
           "teacher_valid_loss": "the OKD teacher's NLL on the valid references (its online modules move it)"}


def read_trajectories(units_dir: Path) -> list[dict]:
    """The student markers in ``units_dir`` that carry a trajectory and their grid coordinates."""
    found = []
    for path in sorted(Path(units_dir).glob("student-*.json")):
        marker = json.loads(path.read_text())
        if marker.get("trajectory") and marker.get("coords"):
            found.append(marker)
    return found


def _movement(values: Sequence[float]) -> str:
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    if not steps or all(s == 0 for s in steps):
        return "constant"
    if all(s >= 0 for s in steps):
        return "rose at every validation" if all(s > 0 for s in steps) else "never fell"
    if all(s <= 0 for s in steps):
        return "fell at every validation" if all(s < 0 for s in steps) else "never rose"
    return "moved both ways"


def trajectory_tables(markers: Sequence[dict]) -> list[str]:
    """Markdown blocks, one per tracked quantity some student has (empty list when none has any)."""
    blocks = []
    for key, title in TRACKED.items():
        rows = [(m["coords"], [(r["step"], r[key]) for r in m["trajectory"] if r.get(key) is not None])
                for m in markers]
        rows = [(c, points) for c, points in rows if points]
        if not rows:
            continue
        steps = sorted({s for _, points in rows for s, _ in points})
        body = []
        for coords, points in sorted(rows, key=lambda r: (r[0]["method"], r[0]["size"], r[0]["seed"])):
            at = dict(points)
            body.append([coords["method"], coords["size"], str(coords["seed"])]
                        + [f"{at[s]:.3f}" if s in at else "–" for s in steps]
                        + [_movement([v for _, v in points])])
        table = markdown_table(["method", "size", "seed", *(f"step {s}" for s in steps), "movement"], body)
        blocks.append(f"{title[0].upper()}{title[1:]}, at each validation:\n\n{table}")
    return blocks
