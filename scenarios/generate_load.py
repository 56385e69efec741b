"""Write a generated load scenario: `python scenarios/generate_load.py [SIZE] [SEED]`.

`load_1000.yaml` in this folder is its output for size 1000, seed 1000; the test
suite regenerates it and fails if the checked-in file differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simulator.workload import render_yaml

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    size = int(argv[1]) if len(argv) > 1 else 1000
    seed = int(argv[2]) if len(argv) > 2 else size
    target = HERE / f"load_{size}.yaml"
    target.write_text(render_yaml(size, seed), encoding="utf-8")
    print(f"wrote {target.name}")


if __name__ == "__main__":
    main(sys.argv)
