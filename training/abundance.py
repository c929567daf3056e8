"""Information abundance of a trained model's embeddings (issue 8, embedding collapse).

For one field's embedding matrix E (the rows of that field's vocabulary in the shared table,
[rows, dim]) the information abundance is IA(E) = sum_k sigma_k / max_k sigma_k, the sum of
its singular values over the largest: 1 when E is rank one (collapsed), up to min(rows, dim)
when the spectrum is flat. Computed for every categorical and multi-valued field, and for
multi-embedding models (config.embedding_sets = M) for each set separately.

For M > 1 sets, `ia_joint` is the IA of the field's M blocks side by side ([rows, M x dim]),
the matrix a single embedding of width M x dim would have: the figure to set against a wider
single embedding in the embedding-collapse paper's scaling experiment (for M = 1 it equals
the one set's IA).

Our choices: every row of the field's block counts (including the encoder's out-of-vocabulary
/ padding row 0); numeric fields are left out (one learned vector each, IA 1 by definition);
an all-zero matrix has IA 0.

abundance.json (in the run directory):
    {"embedding_sets": M, "embedding_dim": D,
     "fields": [{"field": name, "kind": "categorical"|"multi", "rows": n, "ia": [per set],
                 "ia_joint": IA of the sets side by side}],
     "mean": [mean IA over fields, per set], "overall_mean": mean over fields and sets,
     "joint_mean": mean of ia_joint over fields}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ctrserve.common.errors import UserError
from ctrserve.models.base import CTRModel

ABUNDANCE_FILE = "abundance.json"


class AbundanceError(UserError):
    """A run whose information abundance cannot be computed or read."""


def information_abundance(matrix: torch.Tensor) -> float:
    """sum of singular values / largest singular value of a 2-D matrix (0 for all zeros)."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.detach().to(torch.float64).cpu())
    top = float(sigma.max()) if sigma.numel() else 0.0
    return float(sigma.sum()) / top if top > 0 else 0.0


def field_blocks(layout: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(field, kind, start row, rows) of each field's block in FeatureEmbedding's table."""
    blocks, start = [], 0
    for kind in ("categorical", "multi"):
        for name, size in layout[kind]:
            blocks.append((name, kind, start, int(size)))
            start += int(size)
    return blocks


def compute_abundance(model: CTRModel, layout: dict[str, Any]) -> dict[str, Any] | None:
    """Per field and per embedding set; None for a model without embedding tables (LR)."""
    tables = model.embedding_tables()
    if not tables:
        return None
    weights = [t.table.weight for t in tables]
    fields = []
    for name, kind, start, rows in field_blocks(layout):
        blocks = [w[start : start + rows] for w in weights]
        ia = [information_abundance(b) for b in blocks]
        joint = ia[0] if len(blocks) == 1 else information_abundance(torch.cat(blocks, dim=1))
        fields.append({"field": name, "kind": kind, "rows": rows, "ia": ia, "ia_joint": joint})
    mean = [sum(f["ia"][s] for f in fields) / len(fields) if fields else 0.0
            for s in range(len(tables))]
    joint_mean = sum(f["ia_joint"] for f in fields) / len(fields) if fields else 0.0
    return {"embedding_sets": len(tables), "embedding_dim": int(weights[0].shape[1]),
            "fields": fields, "mean": mean, "overall_mean": sum(mean) / len(mean),
            "joint_mean": joint_mean}


def write_abundance(out: Path, model: CTRModel, layout: dict[str, Any]) -> dict[str, Any] | None:
    result = compute_abundance(model, layout)
    if result is not None:
        (out / ABUNDANCE_FILE).write_text(json.dumps(result, indent=1))
    return result


def read_abundance(run_dir: str | Path) -> dict[str, Any]:
    """abundance.json of a run; for runs written before it existed, computed from model.pt."""
    path = Path(run_dir)
    file = path / ABUNDANCE_FILE
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise AbundanceError(f"{file}: not valid JSON ({exc})") from None
    from ctrserve.training.run_dir import load_run

    run = load_run(path)
    result = compute_abundance(run.load_model(), run.encoder.layout())
    if result is None:
        raise AbundanceError(f"{path}: model {run.info['model']['name']!r} has no embedding "
                             "table")
    return result


def manifest_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The compact form stored in a bundle manifest: mean per set and IA per field and set."""
    return {"embedding_sets": result["embedding_sets"], "mean": result["mean"],
            "overall_mean": result["overall_mean"],
            "fields": {f["field"]: f["ia"] for f in result["fields"]}}


def format_table(result: dict[str, Any]) -> str:
    """field, vocabulary rows, IA per set; then the mean per set."""
    sets = result["embedding_sets"]
    head = ["field", "rows", *(f"IA set {s}" for s in range(sets))]
    body = [[f["field"], str(f["rows"]), *(f"{v:.3f}" for v in f["ia"])]
            for f in result["fields"]]
    body.append(["mean", "", *(f"{v:.3f}" for v in result["mean"])])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, body[:-1]), rule, line(body[-1])])
