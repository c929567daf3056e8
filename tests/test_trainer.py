"""Training and export through the CLI: run directories, bundles, parity, verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from ctrserve.bundles import load_bundle
from ctrserve.cli import main
from tests.conftest import train_cli
from tests.model_checks import PARITY, independent_parity

MODELS = ("lr", "fm", "deepfm", "apg-deepfm")


@pytest.mark.parametrize("model", MODELS)
def test_train_writes_a_complete_run(trained_runs, model):
    run = trained_runs[model]
    for name in ("run.json", "encoder.json", "learning_curve.json", "model.pt",
                 "parity_inputs.npz"):
        assert (run / name).exists(), name
    info = json.loads((run / "run.json").read_text())
    test = info["metrics"]["test"]
    assert 0.6 < test["auc"] <= 1.0, "a trained model ranks clearly better than chance"
    assert 0 < test["logloss"] < 1.0
    assert info["data"]["source"] == "synth"
    curve = json.loads((run / "learning_curve.json").read_text())
    assert [e["epoch"] for e in curve] == list(range(1, len(curve) + 1))
    assert all(e["samples_per_second"] > 0 for e in curve)


@pytest.mark.parametrize("model", MODELS)
def test_bundle_verifies_and_records_parity(trained_runs, bundles, synth_dir, model):
    bundle = load_bundle(bundles[model])
    m = bundle.manifest
    assert m.model_type == model
    assert m.parity.rows >= 1000 and m.parity.max_abs_diff <= 1e-5
    # recomputed here, not read from the exporter's record: ONNX against the run's weights
    assert independent_parity(trained_runs[model], bundles[model], synth_dir) <= PARITY
    assert all(t.shape[0] == "batch" for t in m.inputs), "dynamic batch axis"
    assert {t.dtype for t in m.inputs if t.name.endswith("_ids")} == {"int64"}
    assert m.metrics["test"]["auc"] > 0.5
    if model == "apg-deepfm":
        assert m.parity.fold_max_abs_diff is not None and m.parity.fold_max_abs_diff < 1e-5


def test_bundle_scores_raw_rows_like_the_trained_model(bundles, synth_dir):
    """Raw features -> the bundle's own encoder -> ONNX gives the run's test metrics."""
    bundle = load_bundle(bundles["deepfm"])
    day = sorted((synth_dir / "impressions").glob("*.parquet"))[-1]
    table = pq.read_table(day)
    encoded = bundle.encoder.transform({n: table.column(n) for n in bundle.encoder.spec.names})
    probs = bundle.session.run(None, encoded)[0]
    assert probs.shape == (table.num_rows,) and np.all((probs > 0) & (probs < 1))
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(table.column("label").to_numpy(), probs)
    assert auc == pytest.approx(bundle.manifest.metrics["test"]["auc"], abs=1e-4)


def test_export_prints_the_bundle_path_and_is_content_addressed(trained_runs, bundles,
                                                                 tmp_path, capsys):
    assert main(["export", str(trained_runs["fm"]), "--registry", str(tmp_path)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    (again,) = list(tmp_path.iterdir())
    assert printed == again and again.name == bundles["fm"].name


def test_training_streams_when_the_split_exceeds_the_buffer(synth_dir, tmp_path):
    """A shuffle buffer smaller than one day file still trains (the larger-than-memory path)."""
    assert train_cli(synth_dir, tmp_path / "run", "fm", "--buffer-rows", "700") == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["metrics"]["test"]["auc"] > 0.6


def test_an_empty_split_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("user,clicked\nu1,0\nu2,1\n")
    (tmp_path / "empty.csv").write_text("user,clicked\n")
    spec = {"name": "clicks", "label": "clicked", "fields": [{"name": "user",
                                                              "kind": "categorical"}],
            "files": {"train": "train.csv", "valid": "empty.csv", "test": "train.csv"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["train", "--model", "lr", "--data", str(tmp_path / "spec.json"),
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert "valid split is empty" in capsys.readouterr().err


def test_a_modified_model_file_is_refused(bundles, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["lr"], copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.onnx" in err and "sha256" in err and len(err.splitlines()) == 1


def test_a_bundle_with_failed_parity_is_refused(bundles, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["lr"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parity"]["max_abs_diff"] = 3e-3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    assert "parity" in capsys.readouterr().err


def test_onnx_batch_axis_is_dynamic(bundles):
    bundle = load_bundle(bundles["apg-deepfm"])
    rows = {i.name: i for i in bundle.session.get_inputs()}
    for n in (1, 7, 300):
        feeds = {name: np.zeros([n, *info.shape[1:]],
                                dtype=np.int64 if "int64" in info.type else np.float32)
                 for name, info in rows.items()}
        assert bundle.session.run(None, feeds)[0].shape == (n,)
    assert isinstance(bundle.session, ort.InferenceSession)


def test_training_is_reproducible_with_a_seed(synth_dir, tmp_path):
    for name in ("a", "b"):
        assert train_cli(synth_dir, tmp_path / name, "lr", "--epochs", "1") == 0
    a, b = (json.loads((tmp_path / n / "run.json").read_text()) for n in ("a", "b"))
    assert a["metrics"]["test"] == b["metrics"]["test"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "xgboost", "--data", "synth:/nowhere", "--out", "x"],
         "unknown model 'xgboost'"),
        (["train", "--model", "lr", "--data", "parquet:/x", "--out", "x"], "unknown kind"),
        (["train", "--model", "lr", "--data", "synth:/does/not/exist", "--out", "x"],
         "/does/not/exist"),
        (["export", "/does/not/exist", "--registry", "r"], "not a run directory"),
        (["verify", "/does/not/exist"], "manifest.json: missing"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_label_that_is_not_binary_is_refused_naming_the_file(tmp_path, capsys):
    csv = tmp_path / "clicks.csv"
    csv.write_text("user,item,clicked\nu1,i1,0\nu2,i2,3\nu1,i2,1\n")
    spec = {"name": "clicks", "label": "clicked",
            "fields": [{"name": "user", "kind": "categorical"},
                       {"name": "item", "kind": "categorical"}],
            "files": {"train": "clicks.csv", "valid": "clicks.csv", "test": "clicks.csv"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["train", "--model", "lr", "--data", str(tmp_path / "spec.json"),
            "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "clicks.csv" in err and "0/1" in err and "clicked" in err


def test_export_refuses_an_incomplete_run(trained_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["lr"], run)
    (run / "model.pt").unlink()
    assert main(["export", str(run), "--registry", str(tmp_path / "reg")]) == 2
    assert "model.pt" in capsys.readouterr().err





@pytest.mark.parametrize("model", ["lr", "fm", "deepfm", "apg-deepfm"])
def test_a_warm_started_model_scores_like_its_bundle_before_training(trained_runs, bundles,
                                                                     model):
    """The champion's ONNX weights come back into a fresh (APG: unfolded) PyTorch model."""
    import torch

    from ctrserve.models import ModelConfig, build_model
    from ctrserve.training.run_dir import load_run
    from ctrserve.training.warm_start import bundle_weights, load_weights

    bundle = load_bundle(bundles[model])
    config = ModelConfig.from_dict(bundle.manifest.hyperparameters["model"])
    fresh = build_model(config, bundle.encoder.layout())
    report = load_weights(fresh, bundle_weights(bundle.path))
    assert report["loaded"] > 0
    if model == "apg-deepfm":  # U_r and V_l stay random; U_l and V_r are solved for
        assert report["fresh"]
        assert all(k.endswith((".u_r.weight", ".v_l.weight")) for k in report["fresh"])
    else:
        assert report["fresh"] == []
    rows = load_run(trained_runs[model]).parity_inputs()
    feeds = dict(zip(bundle.encoder.input_names(), rows.inputs, strict=True))
    expected = bundle.session.run(None, feeds)[0].reshape(-1)
    with torch.no_grad():
        logits = fresh.eval()(*(torch.from_numpy(x) for x in rows.inputs))
    assert np.max(np.abs(torch.sigmoid(logits).numpy().reshape(-1) - expected)) < 1e-5
