"""The experiment runner: `fedmoe sweep` under another name (fedmoe/sweep/ holds the code).
Examples:

  python bench/experiments.py experiments/smoke.toml
  python bench/experiments.py experiments/paper.toml --dry-run
  python bench/experiments.py experiments/paper.toml --out runs/paper
"""

from __future__ import annotations

import sys

from fedmoe.sweep.main import main

if __name__ == "__main__":
    sys.exit(main())
