"""Write the latest `rl_verdict` of a data folder into the README's "Did RL help?" section.

    python -m refine_af_pipeline.evaluation.readme_verdict \\
        --database data/experiment/refine_af.duckdb --readme README.md

The section between the two markers is replaced by the verdict table and the run it came from;
the rest of the file is left as it is. Without --readme the block is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb

from .verdict import RULE, verdict_markdown

START, END = "<!-- rl_verdict:start -->", "<!-- rl_verdict:end -->"


def read_verdict(database: str | Path) -> list[dict]:
    path = Path(database)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `make experiment` (or `make run`) first")
    with duckdb.connect(str(path), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "rl_verdict" not in tables:
            raise LookupError(f"{path} has no rl_verdict table: materialize rl_verdict first")
        cursor = conn.execute("SELECT * FROM rl_verdict")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def verdict_block(rows: list[dict], source: str) -> str:
    run = rows[0]["run_id"] if rows else "none"
    return "\n".join([START, f"From `{source}`, run `{run}`. Rule: {RULE}.", "", verdict_markdown(rows), END])


def replace_block(text: str, block: str, where: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{where} needs exactly one {START} followed by one {END} where the verdict goes")
    return text[: text.index(START)] + block + text[text.index(END) + len(END) :]


def _shown_path(database: str) -> str:
    # The README names the file as a reader of the clone would: relative to it when it lies inside.
    path = Path(database).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="the data folder's refine_af.duckdb")
    parser.add_argument("--readme", help="the file whose marked block is replaced (printed when left out)")
    args = parser.parse_args(argv)
    block = verdict_block(read_verdict(args.database), _shown_path(args.database))
    if args.readme is None:
        print(block)
        return 0
    path = Path(args.readme)
    path.write_text(replace_block(path.read_text(), block, str(path)))
    print(f"{path}: verdict of {args.database} written between the markers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
