"""`ctrserve scaling`: the embedding-collapse paper's scaling experiment on one data split.

"On the Embedding Collapse When Scaling up Recommendation Models" grows a model's embeddings
k-fold in two ways: one table k times wider (single-embedding) or k independent tables of the
base width, each with its own interaction, averaged (multi-embedding). For every factor k it
trains both (k = 1 is the plain model, shared by both rows) over several seeds and reports
test AUC and logloss (mean and spread), the mean information abundance per set and of the
sets side by side (`ia_joint`, comparable with the single table of the same total width;
see training/abundance.py), embedding parameters and training throughput.

Writes results.json (every run) and results.md (the table) to the output directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ctrserve.models import ModelConfig
from ctrserve.training.compare import mean_sd
from ctrserve.training.data.source import DataSource
from ctrserve.training.train import TrainConfig, train


def scaling_configs(base: ModelConfig, factors: list[int]) -> list[tuple[str, ModelConfig]]:
    """(label, config) for each factor: a k-times wider single table and k tables of the base."""
    configs: list[tuple[str, ModelConfig]] = []
    for k in factors:
        configs.append((f"{k}x single", replace(base, embedding_dim=base.embedding_dim * k,
                                                embedding_sets=1)))
        if k > 1:
            configs.append((f"{k}x multi", replace(base, embedding_sets=k)))
    return configs


def run_scaling(source: DataSource, base: ModelConfig, train_cfg: TrainConfig,
                factors: list[int], seeds: list[int], out: Path,
                progress: bool = True) -> dict[str, Any]:
    configs, runs = scaling_configs(base, factors), []
    for label, model in configs:
        for seed in seeds:
            if progress:
                print(f"== {label} (dim {model.embedding_dim} x {model.embedding_sets} sets) "
                      f"seed {seed} ==", flush=True)
            run_dir = out / "runs" / f"{label.replace(' ', '-')}-seed{seed}"
            info = train(source, model, replace(train_cfg, seed=seed), run_dir, progress=progress)
            abundance = json.loads((run_dir / "abundance.json").read_text())
            runs.append({"config": label, "embedding_dim": model.embedding_dim,
                         "embedding_sets": model.embedding_sets, "seed": seed,
                         "run": str(run_dir), "test": info["metrics"]["test"],
                         "best_epoch": info["best_epoch"],
                         "samples_per_second": info["train_samples_per_second"],
                         "ia_per_set": abundance["overall_mean"],
                         "ia_joint": abundance["joint_mean"],
                         "embedding_rows": sum(f["rows"] for f in abundance["fields"])})
    summary = [_summarise([r for r in runs if r["config"] == label])
               for label, _ in configs]
    result = {"source": source.describe(), "base_model": base.to_dict(),
              "train": asdict(train_cfg), "factors": factors, "seeds": seeds,
              "summary": summary, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "results.md").write_text(markdown_table(summary) + "\n")
    return result


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return mean_sd([r[key] for r in runs])[0]

    first = runs[0]
    auc, auc_sd = mean_sd([r["test"]["auc"] for r in runs])
    ll, ll_sd = mean_sd([r["test"]["logloss"] for r in runs])
    return {"config": first["config"], "embedding_dim": first["embedding_dim"],
            "embedding_sets": first["embedding_sets"],
            "embedding_params": first["embedding_rows"] * first["embedding_dim"]
            * first["embedding_sets"],
            "auc": auc, "auc_std": auc_sd, "logloss": ll, "logloss_std": ll_sd,
            "ia_per_set": mean("ia_per_set"), "ia_joint": mean("ia_joint"),
            "best_epoch": mean("best_epoch"), "samples_per_second": mean("samples_per_second"),
            "seeds": len(runs)}


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| config | dim x sets | embedding params | test AUC | test logloss "
             "| IA per set | IA joint | best epoch | train samples/s | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['config']} | {s['embedding_dim']} x {s['embedding_sets']} | "
            f"{s['embedding_params']:,} | {s['auc']:.4f} ± {s['auc_std']:.4f} | "
            f"{s['logloss']:.4f} ± {s['logloss_std']:.4f} | {s['ia_per_set']:.2f} | "
            f"{s['ia_joint']:.2f} | {s['best_epoch']:.1f} | {s['samples_per_second']:,.0f} | "
            f"{s['seeds']} |")
    return "\n".join(lines)
