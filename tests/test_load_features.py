"""`ctrserve load-features` with a user's own CSV: a malformed row is named by its line, and a
column without a name (a pandas index written with the data) is refused, not loaded as ""."""

from __future__ import annotations

from ctrserve.cli import main


def rows(n: int) -> str:
    return "user_id,age,score\n" + "".join(f"u{i},{20 + i % 50},{i / 10:.1f}\n" for i in range(n))


def test_a_malformed_csv_row_names_its_line(tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text(rows(100) + "u100,31,0.5,extra\n")
    code = main(["load-features", "--users", str(users), "--redis-db", str(tmp_path / "r.rdb")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "line 102 has 4 cell(s), the header 3" in err


def test_an_unnamed_index_column_is_refused(tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text(",user_id,age\n0,u0,31\n1,u1,42\n")  # pandas' to_csv with its index
    code = main(["load-features", "--users", str(users), "--redis-db", str(tmp_path / "r.rdb")])
    err = capsys.readouterr().err
    assert code == 2 and "have no name" in err and "index=False" in err


def test_a_clean_csv_loads(tmp_path, capsys):
    users = tmp_path / "users.csv"
    users.write_text(rows(10))
    assert main(["load-features", "--users", str(users), "--redis-db",
                 str(tmp_path / "r.rdb")]) == 0
    assert '"rows": 10' in capsys.readouterr().out
