"""Bring your own data: a new user's CSV files and spec through `inspect` and `train`, spec
errors that name the key path, CSV errors that name the column and the row, and the JSON
Schema committed beside the docs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ctrserve.cli import main
from ctrserve.training.data import tabular
from ctrserve.training.data.spec import schema_text
from tests.conftest import REPO
from tests.serve_process import ServeProcess

TINY_MODEL = ["--mlp", "16", "--embedding-dim", "4", "--batch-size", "128", "--epochs", "1",
              "--no-progress"]


def write_clicks(path: Path, rows: int, clicks_every: int, campaign: str, start: int = 0) -> None:
    """A pandas-style export: an unnamed index column first, then the user's columns."""
    lines = [",user,item,tags,price,campaign,ts,clicked"]
    for i in range(start, start + rows):
        tags = "|".join(["sale", "new", "gift"][: i % 4])
        clicked = int(i % clicks_every == 0)
        lines.append(f"{i},u{i % 30},i{i % 20},{tags},{(i % 50) * 1.5},{campaign},{i},{clicked}")
    path.write_text("\n".join(lines) + "\n")


SPEC = """\
name: my-clicks
label: clicked
fields:
  - {name: user, kind: categorical}
  - {name: item, kind: categorical, min_count: 2}
  - {name: tags, kind: multi, separator: "|", max_len: 3}
  - {name: price, kind: numeric, transform: log_standard}
  - {name: campaign, kind: categorical}
files: {train: train.csv, test: test.csv}
split: {kind: random, seed: 3, valid_fraction: 0.2}
"""


@pytest.fixture()
def my_data(tmp_path: Path) -> Path:
    # train: 10% clicks, campaign c1; test: 40% clicks, a campaign train never saw
    write_clicks(tmp_path / "train.csv", 600, 10, "c1")
    lines = [",user,item,tags,price,campaign,ts,clicked"]
    for i in range(200):
        lines.append(f"{i},u{i % 30},i{i % 20},sale,{i * 1.5},c9,{600 + i},{int(i % 5 < 2)}")
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "clicks.yaml").write_text(SPEC)
    return tmp_path / "clicks.yaml"


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_own_csv_through_inspect_and_train(my_data, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "inspect", "--data", str(my_data), "--json")
    assert code == 0
    report = json.loads(out)
    splits = report["splits"]
    assert splits["train"]["rows"] + splits["valid"]["rows"] == 600
    assert splits["valid"]["rows"] == pytest.approx(120, abs=30)
    assert splits["train"]["positives"] + splits["valid"]["positives"] == 60
    assert splits["test"] == {"rows": 200, "positives": 80, "click_rate": 0.4}
    fields = report["fields"]
    assert fields["campaign"]["cardinality"] == {"train": 1, "valid": 1, "test": 1}
    assert fields["campaign"]["unseen_in_train"] == {"valid": 0.0, "test": 1.0}
    assert fields["user"]["unseen_in_train"] == {"valid": 0.0, "test": 0.0}
    assert fields["tags"]["missing_rate"]["test"] == 0.0
    assert 0.2 < fields["tags"]["missing_rate"]["train"] < 0.3  # every 4th row has no tags
    assert "unseen_in_train" not in fields["price"]
    warnings = report["warnings"]
    assert any("click rate shifts" in w and "test (0.4000)" in w for w in warnings)
    assert not any("between train" in w and "valid" in w for w in warnings)
    assert "field 'campaign': every test value is unseen in train (100%): " \
           "the model knows none of them (OOV)" in warnings
    assert any(w.startswith(f"{tmp_path / 'train.csv'}: column(s) ['']") for w in warnings)
    assert report["data"]["files"]["train"] == [str(tmp_path / "train.csv")]

    code, text, _ = run_cli(capsys, "inspect", "--data", str(my_data))
    assert code == 0
    assert "click rate" in text and "unseen test" in text and "! field 'campaign'" in text

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", "deepfm", "--data", str(my_data),
                           "--out", str(run), *TINY_MODEL)
    assert code == 0, err
    assert "warning: data: field 'campaign': every test value is unseen" in err
    info = json.loads((run / "run.json").read_text())
    assert info["inspect"]["splits"] == splits
    assert info["inspect"]["fields"] == fields
    assert info["inspect"]["warnings"] == warnings
    assert info["data"]["spec_file"] == str(my_data)
    assert all(Path(p).is_absolute() for ps in info["data"]["files"].values() for p in ps)
    assert info["data"]["split"] == {"kind": "random", "valid_fraction": 0.2, "seed": 3}


def test_relative_spec_path_is_recorded_absolute(my_data, monkeypatch, capsys):
    monkeypatch.chdir(my_data.parent.parent)
    relative = f"{my_data.parent.name}/{my_data.name}"
    code, out, _ = run_cli(capsys, "inspect", "--data", relative, "--json")
    assert code == 0
    assert json.loads(out)["data"]["spec_file"] == str(my_data)


def test_temporal_carve_holds_out_the_latest_train_rows(my_data, capsys):
    my_data.write_text(SPEC.replace("{kind: random, seed: 3, valid_fraction: 0.2}",
                                    "{kind: temporal, time_column: ts, valid_fraction: 0.25}"))
    from ctrserve.training.data import open_source

    source = open_source(str(my_data))
    cut = source.splits()
    assert (cut["train"].num_rows, cut["valid"].num_rows) == (450, 150)
    assert max(cut["train"].column("ts").to_pylist()) < min(cut["valid"].column("ts").to_pylist())
    assert source.describe()["window"]["valid"] == {"start": "450", "end": "599"}


# ---- spec errors name the key path -----------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("kind: categorical, min_count: 2}", "kind: categorical, min_count: 0}"),
         "fields[1].min_count: must be >= 1, got 0"),
        (("transform: log_standard}", "transform: sqrt}"),
         "fields[3].transform: must be one of 'none', 'log', 'standard' or 'log_standard', "
         "got 'sqrt'"),
        (("{name: campaign, kind: categorical}", "{name: campaign, kind: categorical, "
                                                 "transform: log}"),
         "fields[4].transform: only applies to numeric fields, not to a categorical field"),
        (("{name: campaign, kind: categorical}", "{name: user, kind: categorical}"),
         "fields[4].name: 'user' is declared twice (also fields[0])"),
        (("{name: campaign, kind: categorical}", "{name: clicked, kind: categorical}"),
         "label: 'clicked' is also declared as a feature field (fields[4])"),
        (("{name: campaign, kind: categorical}", "{name: campaign, kind: category}"),
         "fields[4].kind: must be one of 'categorical', 'multi' or 'numeric', got 'category'"),
        (("max_len: 3}", "max_len: 3, buckets: 9}"), "fields[2].buckets: unknown key"),
        (("valid_fraction: 0.2", "valid_fraction: 1.5"), "split.valid_fraction: must be < 1"),
        (("seed: 3, valid_fraction", "fractions: [0.8, 0.1], valid_fraction"),
         "split.fractions: only goes with one 'file'"),
        (("split: {kind: random, seed: 3, valid_fraction: 0.2}", ""),
         "files.valid: missing; give valid files, or a 'split' rule"),
        (("label: clicked", "label: clicked\ncolumns: [a, a]"), "columns[1]: 'a' is named twice"),
        (("test: test.csv", "test: nothing-*.csv"), "files.test: no file matches"),
    ],
)
def test_spec_errors_name_the_key_path(my_data, capsys, change, message):
    old, new = change
    assert old in SPEC
    my_data.write_text(SPEC.replace(old, new))
    code, _, err = run_cli(capsys, "inspect", "--data", str(my_data))
    assert code == 2
    assert err.startswith(f"ctrserve inspect: error: {my_data}: ")
    assert message in err
    assert "Traceback" not in err


# ---- CSV data errors name the column and the row -----------------------------------------------
def test_csv_type_error_names_column_and_row(my_data, monkeypatch, capsys):
    train = my_data.parent / "train.csv"
    lines = train.read_text().splitlines()
    cells = lines[400].split(",")
    cells[4] = "abc"  # price of data row 400 (line 401)
    lines[400] = ",".join(cells)
    train.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(tabular, "BLOCK_SIZE", 4096)  # the bad row is in a later block
    code, _, err = run_cli(capsys, "inspect", "--data", str(my_data))
    assert code == 2
    assert f"{train}: column 'price', row 400 (line 401): 'abc' is not a number" in err


def test_label_error_names_the_label_column(my_data, capsys):
    test = my_data.parent / "test.csv"
    lines = test.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 1)[0] + ",yes"
    test.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "inspect", "--data", str(my_data))
    assert code == 2
    assert f"{test}: column 'clicked', row 7 (line 8): 'yes' is not an integer" in err


def test_headerless_tsv_with_columns(tmp_path, capsys):
    rows = [f"{i % 2}\t{i * 0.5}\tu{i % 7}" for i in range(60)]
    rows[33] = "1\tlots\tu3"
    (tmp_path / "all.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "s.json").write_text(json.dumps({
        "columns": ["click", "amount", "user"], "label": "click",
        "fields": [{"name": "user", "kind": "categorical"},
                   {"name": "amount", "kind": "numeric"}],
        "file": "all.tsv", "split": {"kind": "random", "seed": 1}}))
    code, _, err = run_cli(capsys, "inspect", "--data", str(tmp_path / "s.json"))
    assert code == 2
    assert "all.tsv: column 'amount', row 34 (line 34): 'lots' is not a number" in err
    rows[33] = "1\t2.5\tu3"
    (tmp_path / "all.tsv").write_text("\n".join(rows) + "\n")
    code, out, _ = run_cli(capsys, "inspect", "--data", str(tmp_path / "s.json"), "--json")
    assert code == 0
    report = json.loads(out)
    assert sum(s["rows"] for s in report["splits"].values()) == 60
    assert report["fields"]["user"]["cardinality"]["train"] == 7
    assert report["warnings"] == []


def test_short_csv_row_names_the_line(my_data, capsys):
    train = my_data.parent / "train.csv"
    lines = train.read_text().splitlines()
    lines[12] = "11,u11,i11"
    train.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "inspect", "--data", str(my_data))
    assert code == 2
    assert f"{train}: line 13 has 3 cell(s), the header 8: '11,u11,i11'" in err


# ---- the JSON Schema --------------------------------------------------------------------------
def test_committed_schema_is_generated_from_the_model():
    committed = REPO / "docs" / "dataset-spec.schema.json"
    assert committed.read_text() == schema_text(), (
        "regenerate it: python -m ctrserve.training.data.spec > docs/dataset-spec.schema.json")
    schema = json.loads(committed.read_text())
    assert set(schema["properties"]) == {"name", "label", "fields", "files", "file", "split",
                                         "format", "delimiter", "columns"}
    field = schema["$defs"]["FieldSpec"]["properties"]
    assert set(field) == {"name", "kind", "min_count", "hash_buckets", "max_len", "separator",
                          "transform"}
    assert all(p.get("description") for p in field.values())


# ---- the Parquet example of the data reference page, on the synthetic world ------------------
PARQUET_SPEC = """\
# The synthetic world's impression logs (ctrserve synth --out world): Parquet, a file a day
name: app-clicks
label: label
fields:
  - {name: user_id, kind: categorical, min_count: 2}
  - {name: app_id, kind: categorical, min_count: 2}
  - {name: recent_categories, kind: multi, max_len: 5}
  - {name: category, kind: categorical}
  - {name: hour, kind: categorical}
  - {name: size_mb, kind: numeric, transform: log_standard}
files:
  train: "world/impressions/day=2026-11-0[1-3].parquet"
  test: world/impressions/day=2026-11-04.parquet
split: {kind: temporal, time_column: ts, valid_fraction: 0.1}
"""


def test_parquet_example_on_the_synthetic_world(synth_dir, tmp_path, capsys):
    (tmp_path / "world").symlink_to(synth_dir)
    (tmp_path / "app-clicks.yaml").write_text(PARQUET_SPEC)
    code, out, err = run_cli(capsys, "inspect", "--data", str(tmp_path / "app-clicks.yaml"),
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = {s: v["rows"] for s, v in report["splits"].items()}
    assert rows == {"train": 16_200, "valid": 1_800, "test": 6_000}
    assert report["fields"]["recent_categories"]["kind"] == "multi"
    assert report["fields"]["hour"]["cardinality"]["train"] == 24
    window = report["data"]["window"]
    assert window["train"]["end"] <= window["valid"]["start"]
    assert window["valid"]["end"].startswith("2026-11-03")


# ---- docs/data.md, end to end: a new user's CSV to a served score ----------------------------
def _docs_blocks() -> list:
    from tests.test_doc_examples import fenced_blocks

    blocks, _ = fenced_blocks(REPO / "docs" / "data.md")
    return [b for b in blocks if b.lang == "bash"]


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _serve_args(line: str, cwd: Path) -> list[str]:
    """The documented `ctrserve serve ...` line's arguments, expanded as the shell would."""
    args = line.removeprefix("ctrserve serve ")
    out = _bash(f"printf '%s\\n' {args}", cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_docs_take_a_new_users_csv_to_a_served_score(tmp_path: Path) -> None:
    blocks = _docs_blocks()
    build = next(b for b in blocks if "mkdir -p mine" in b.text)
    done = _bash(build.text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    serve = next(b for b in blocks if b.text.startswith("ctrserve serve --registry mine"))
    args = _serve_args(serve.text.strip(), tmp_path)
    (mine,) = [b for b in blocks if "mine" in b.flags]
    env = {**os.environ, "CTRSERVE_LOG_LEVEL": "warning"}
    with ServeProcess(args, env, cwd=tmp_path) as server:
        url = server.wait_ready(timeout=120)
        curl = ("curl() { command curl --fail-with-body --silent --show-error \"$@\"; }\n"
                + mine.text.replace("localhost:8000", url.removeprefix("http://")))
        out = _bash(curl, tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        reply = json.loads(out.stdout)
        assert reply["item_ids"] == ["i7", "i8"] and reply["missing_fields"] == []
        assert all(0 < s < 1 for s in reply["scores"]) and reply["scores"][0] != reply["scores"][1]
        assert reply["attribution"] and reply["holdout"] is False
        # the model has a user field: a request without user_id names it
        body = {"candidates": [{"item_id": "i7", "features": {"tags": "a|b", "price": 30}}]}
        anonymous = httpx.post(url + "/v1/score", json=body)
        assert anonymous.status_code == 422
        assert anonymous.json()["detail"][0]["loc"] == ["body", "user_id"]
        assert "'user'" in anonymous.json()["detail"][0]["msg"]


def test_a_model_without_a_user_field_scores_anonymous_requests(tmp_path: Path) -> None:
    build = next(b for b in _docs_blocks() if "mkdir -p mine" in b.text)
    text = build.text.replace("  - {name: user, kind: categorical}\n", "")
    assert text != build.text
    done = _bash(text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (bundle,) = [p.name for p in (tmp_path / "mine" / "registry").iterdir()
                 if p.name.startswith("lr-")]
    env = {**os.environ, "CTRSERVE_LOG_LEVEL": "warning"}
    args = ["--registry", "mine/registry", "--bundle", bundle]
    with ServeProcess(args, env, cwd=tmp_path) as server:
        url = server.wait_ready(timeout=120)
        items = [{"item_id": "i7", "features": {"tags": "a|b", "price": 30}},
                 {"item_id": "i8", "features": {"tags": "c|d", "price": 70}}]
        anonymous = httpx.post(url + "/v1/score", json={"candidates": items})
        assert anonymous.status_code == 200, anonymous.text
        reply = anonymous.json()
        assert reply["holdout"] is True and reply["attribution"] is None
        known = httpx.post(url + "/v1/score", json={"user_id": "u7", "candidates": items}).json()
        assert known["holdout"] is False and known["attribution"]
        assert known["scores"] == reply["scores"]  # no user field: the user changes nothing
        # only the known user's request counts against the arm's guardrails
        metrics = httpx.get(url + "/metrics").text
        served = [line for line in metrics.splitlines()
                  if line.startswith("ctrserve_arm_request_duration_seconds_count{")]
        assert len(served) == 1 and served[0].endswith(" 1.0"), served
