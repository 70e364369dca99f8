"""Loading a training config: milliseconds per ``load_config`` (defaults ← recipe/stage ← overrides), and listing
every bundled recipe (what ``dinomed recipes`` and the DINOPretrain console do at start).

Reported: the median over ``--repeats`` runs of ``--loads`` loads each (a pretraining and a finetuning config
alternately, with two overrides each), and of ``list_recipes()``.

    PYTHONPATH=core_lib/src python benchmarks/config_load.py
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from dinomed.finetune import load_config as finetune_config
    from dinomed.pretrain import load_config as pretrain_config
    from dinomed.recipes import list_recipes

    pretrain_config("tiny_test")  # imports and first reads out of the timing
    per_load, listing = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for i in range(args.loads):
            if i % 2:
                finetune_config("tiny_meddinov3", ["train.max_steps=6", "data.patch_size=[32,32]"])
            else:
                pretrain_config("tiny_test", ["optim.epochs=3", "train.epoch_length=3"])
        per_load.append((time.perf_counter() - started) / args.loads * 1e3)
        started = time.perf_counter()
        list_recipes()
        listing.append((time.perf_counter() - started) * 1e3)
    print(f"load_config: {statistics.median(per_load):.1f} ms per load (median of {args.repeats} x {args.loads})")
    print(f"list_recipes: {statistics.median(listing):.0f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
