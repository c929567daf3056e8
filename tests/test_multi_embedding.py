"""Issue 8: multi-embedding (deepfm, ipnn) and information abundance per field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrserve.cli import main
from ctrserve.models import ModelConfig, build_model
from ctrserve.training.abundance import ABUNDANCE_FILE, information_abundance
from tests.conftest import SMALL_MODEL_FLAGS, train_cli
from tests.model_checks import PARITY, independent_parity

LAYOUT = {"categorical": [("a", 5), ("b", 7)], "multi": [("m", 4)], "numeric": ["x"]}


@pytest.fixture(scope="module")
def multi_runs(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for model in ("deepfm", "ipnn"):
        out = tmp_path_factory.mktemp(f"run-{model}-m2")
        assert train_cli(synth_dir, out, model, "--epochs", "1", "--embedding-sets", "2") == 0
        runs[model] = out
    return runs


@pytest.mark.parametrize("model", ["deepfm", "ipnn"])
def test_two_sets_train_export_verify(multi_runs, synth_dir, tmp_path, capsys, model):
    run = multi_runs[model]
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["embedding_sets"] == 2
    abundance = json.loads((run / ABUNDANCE_FILE).read_text())
    assert abundance["embedding_sets"] == 2 and len(abundance["mean"]) == 2
    assert all(len(f["ia"]) == 2 and f["rows"] >= 1 for f in abundance["fields"])
    state = torch.load(run / "model.pt", weights_only=True)
    assert "extra_embeddings.0.table.weight" in state

    capsys.readouterr()
    assert main(["export", str(run), "--registry", str(tmp_path)]) == 0
    bundle = Path(capsys.readouterr().out.strip())
    assert main(["verify", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    # recomputed here, not read from the exporter's record: ONNX against the run's weights
    assert independent_parity(run, bundle, synth_dir) <= PARITY
    assert manifest["hyperparameters"]["model"]["embedding_sets"] == 2
    summary = manifest["abundance"]
    assert summary["embedding_sets"] == 2 and summary["mean"] == abundance["mean"]
    assert set(summary["fields"]) == {f["field"] for f in abundance["fields"]}


def test_abundance_command_prints_every_field(multi_runs, capsys):
    run = multi_runs["deepfm"]
    abundance = json.loads((run / ABUNDANCE_FILE).read_text())
    capsys.readouterr()
    assert main(["abundance", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "IA set 0" in lines[0] and "IA set 1" in lines[0]
    for f in abundance["fields"]:
        row = next(line for line in lines if line.split()[0] == f["field"])
        assert row.split()[1] == str(f["rows"])
        assert [float(v) for v in row.split()[2:]] == pytest.approx(f["ia"], abs=1e-3)
    assert lines[-1].split()[0] == "mean"


def test_abundance_of_a_run_without_the_file(multi_runs, tmp_path, capsys):
    """Runs written before issue 8 have no abundance.json: computed from model.pt."""
    run = tmp_path / "old-run"
    shutil.copytree(multi_runs["ipnn"], run)
    (run / ABUNDANCE_FILE).unlink()
    capsys.readouterr()
    assert main(["abundance", str(run)]) == 0
    from_weights = capsys.readouterr().out
    assert main(["abundance", str(multi_runs["ipnn"])]) == 0
    assert capsys.readouterr().out == from_weights


def test_abundance_command_bad_path(tmp_path, capsys):
    assert main(["abundance", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctrserve abundance: error:") and "\n" not in err


def test_information_abundance_known_matrices():
    k = 6
    assert information_abundance(torch.eye(k)) == pytest.approx(k)
    u, v = torch.randn(10, 1), torch.randn(1, k)
    assert information_abundance(u @ v) == pytest.approx(1.0, abs=1e-6)
    m = np.random.default_rng(0).normal(size=(20, k))
    sigma = np.linalg.svd(m, compute_uv=False)
    assert information_abundance(torch.from_numpy(m)) == pytest.approx(sigma.sum() / sigma.max())
    assert information_abundance(torch.zeros(3, k)) == 0.0


def test_one_set_keeps_the_plain_state_dict():
    """M = 1 is the plain model: the same parameter names as before issue 8."""
    deepfm = build_model(ModelConfig(name="deepfm", embedding_dim=4, mlp=(8,)), LAYOUT)
    assert list(deepfm.state_dict()) == [
        "linear.bias", "linear.weights.numeric", "linear.weights.table.weight",
        "embedding.numeric", "embedding.table.weight",
        "dnn.net.0.weight", "dnn.net.0.bias", "dnn.net.2.weight", "dnn.net.2.bias"]
    ipnn = build_model(ModelConfig(name="ipnn", embedding_dim=4, mlp=(8,)), LAYOUT)
    assert not any("extra" in k for k in ipnn.state_dict())
    assert ModelConfig.from_dict({"name": "deepfm"}).embedding_sets == 1  # old manifests


def test_sets_average_the_interactions():
    """DeepFM with M sets: linear + mean over sets of (FM + DNN)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deepfm", embedding_dim=4, mlp=(8,),
                                    embedding_sets=3), LAYOUT).eval()
    cat = torch.tensor([[1, 2], [4, 6]])
    multi = torch.tensor([[[1, 2, 0]], [[3, 0, 0]]])
    num = torch.tensor([[0.5], [-1.0]])
    named = {"cat_ids": cat, "multi_ids": multi, "numeric": num}
    parts = []
    for emb, dnn in zip(model.embedding_tables(), [model.dnn, *model.extra_dnns], strict=True):
        e = emb(named)
        parts.append(model.fm(e) + dnn(e.flatten(start_dim=1)).squeeze(-1))
    expected = model.linear(named) + torch.stack(parts).mean(dim=0)
    assert torch.allclose(model(cat, multi, num), expected, atol=1e-6)


@pytest.mark.parametrize("model", ["fm", "apg-deepfm", "opnn"])
def test_unsupported_model_refuses_sets(synth_dir, tmp_path, capsys, model):
    assert train_cli(synth_dir, tmp_path / "run", model, "--embedding-sets", "2") == 2
    err = capsys.readouterr().err
    assert "embedding_sets" in err and model in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="embedding_sets"):
        build_model(ModelConfig(name=model, embedding_sets=2), LAYOUT)


def test_joint_abundance_is_the_sets_side_by_side(multi_runs):
    """ia_joint is the IA of the field's blocks of all sets concatenated along the width."""
    from ctrserve.training.abundance import field_blocks
    from ctrserve.training.run_dir import load_run

    run = load_run(multi_runs["deepfm"])
    model = run.load_model()
    weights = [t.table.weight for t in model.embedding_tables()]
    abundance = json.loads((multi_runs["deepfm"] / ABUNDANCE_FILE).read_text())
    for (name, _, start, rows), f in zip(field_blocks(run.encoder.layout()),
                                         abundance["fields"], strict=True):
        joint = torch.cat([w[start : start + rows] for w in weights], dim=1)
        assert f["field"] == name
        assert f["ia_joint"] == pytest.approx(information_abundance(joint), rel=1e-6)
        assert 1.0 <= f["ia_joint"] <= min(rows, joint.shape[1])
    assert abundance["joint_mean"] == pytest.approx(
        sum(f["ia_joint"] for f in abundance["fields"]) / len(abundance["fields"]))


def test_scaling_command_trains_single_and_multi(synth_dir, tmp_path, capsys):
    out = tmp_path / "scaling"
    flags = [f for f in SMALL_MODEL_FLAGS if f != "--no-progress"]
    assert main(["scaling", "--model", "deepfm", "--factors", "1,2", "--seeds", "1,2",
                 "--data", f"synth:{synth_dir}", "--out", str(out), "--epochs", "1",
                 *flags, "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = {s["config"]: s for s in result["summary"]}
    assert list(rows) == ["1x single", "2x single", "2x multi"]
    assert (rows["2x single"]["embedding_dim"], rows["2x single"]["embedding_sets"]) == (16, 1)
    assert (rows["2x multi"]["embedding_dim"], rows["2x multi"]["embedding_sets"]) == (8, 2)
    assert rows["2x multi"]["embedding_params"] == rows["2x single"]["embedding_params"]
    assert rows["1x single"]["embedding_params"] * 2 == rows["2x single"]["embedding_params"]
    assert all(s["seeds"] == 2 and 0.5 < s["auc"] < 1 for s in rows.values())
    assert rows["1x single"]["ia_joint"] == pytest.approx(rows["1x single"]["ia_per_set"])
    assert len(result["runs"]) == 6
    table = (out / "results.md").read_text()
    assert "| 2x multi | 8 x 2 |" in table


def test_scaling_command_refuses_a_single_embedding_model(synth_dir, tmp_path, capsys):
    assert main(["scaling", "--model", "fm", "--data", f"synth:{synth_dir}",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "embedding_sets" in err
    assert not (tmp_path / "s").exists()
