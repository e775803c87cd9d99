#!/usr/bin/env bash
# The sweep behind the defaults of P, tau and I (README, "Choosing P, tau and I"):
# CIFAR-10 subset, 4 peers, alpha 0.5, seed 0, 15 rounds; one variable at a time around P=2, tau=0.1,
# I=1 (pinned here, so the sweep does not move with the defaults it chose; later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-subset}
ROUNDS=${ROUNDS:-15}
.venv/bin/python bench/compare.py --dataset cifar10 --data-dir "$DATA" --peers 4 --alpha 0.5 --seed 0 \
  --rounds "$ROUNDS" --algorithm fedmoe-da --neighbors 2 --temperature 0.1 --sync-every 1 \
  --out "${OUT:-runs/sweep}" \
  --variant "P=2,tau=0.1,I=1:" \
  --variant "P=1:--neighbors 1" --variant "P=4:--neighbors 4" --variant "P=8:--neighbors 8" \
  --variant "tau=0.05:--temperature 0.05" --variant "tau=0.3:--temperature 0.3" \
  --variant "tau=1:--temperature 1" \
  --variant "I=2:--sync-every 2" --variant "I=4:--sync-every 4" \
  --variant "P=0 (ablation):--neighbors 0" --variant "no intra-peer (ablation):--no-intra-peer"
