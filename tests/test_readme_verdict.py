"""The README's verdict block is rewritten from a data folder's rl_verdict table, nothing else."""

import duckdb
import pytest

from refine_af_pipeline.evaluation.readme_verdict import END, START, main

pytestmark = pytest.mark.unit


def _database(path):
    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "CREATE TABLE rl_verdict AS SELECT 'b. REFINE-AF data beats Self-Instruct data after SFT' AS question, "
            "'refine_af' AS candidate, 'self_instruct' AS reference, 'rouge_l' AS metric, 'tasks' AS judge, "
            "0.02 AS effect, -0.01 AS ci95_low, 0.05 AS ci95_high, 64 AS n_items, 3 AS n_seeds, 0.01 AS margin, "
            "0.04 AS min_detectable_difference, 'cannot tell' AS answer, '' AS note, 'r1' AS run_id"
        )
    return path


def test_the_marked_block_is_replaced_and_the_rest_kept(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{START}\nold figures\n{END}\nafter\n")
    assert main(["--database", str(_database(tmp_path / "db.duckdb")), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "old figures" not in text
    assert "+0.020 [-0.010, +0.050] | 64 x 3" in text and "**cannot tell**" in text and "run `r1`" in text


def test_missing_markers_or_table_are_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="rl_verdict:start"):
        main(["--database", str(_database(tmp_path / "db.duckdb")), "--readme", str(readme)])
    assert readme.read_text() == "no markers here\n"
    with duckdb.connect(str(tmp_path / "empty.duckdb")):
        pass
    with pytest.raises(LookupError, match="no rl_verdict table"):
        main(["--database", str(tmp_path / "empty.duckdb")])


def test_a_database_inside_the_clone_is_named_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    database = _database(tmp_path / "data" / "db.duckdb")
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    monkeypatch.chdir(tmp_path)
    main(["--database", str(database), "--readme", str(readme)])
    assert "From `data/db.duckdb`, run `r1`" in readme.read_text()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.duckdb"
    _database(outside)
    main(["--database", str(outside), "--readme", str(readme)])
    assert f"From `{outside}`" in readme.read_text()
