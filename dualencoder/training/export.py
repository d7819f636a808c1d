"""The end of a run: the best model, merged, saved beside its processor, metrics, options and card.

Everything is written to `output_dir/.export.tmp` and moved in file by file with `metrics.json` last,
so a crash never leaves half a model and a `metrics.json` means a complete export. The run's options
go to `training_args.json` (what the evaluation commands read); the card (`README.md`) is for people.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from dualencoder.adapters import adapter_towers, save_adapters
from dualencoder.evaluation.common import TRAINING_ARGS_FILE
from dualencoder.metrics import format_metrics_table
from dualencoder.training.arguments import all_options
from dualencoder.training.checkpoints import move_into
from dualencoder.training.model_card import write_model_card

logger = logging.getLogger(__name__)
# metrics.json key -> the row name of the printed table and of the card
TABLE_ROWS = {"before_training": "untrained (validation)", "validation": "best (validation)", "test": "test",
              "test_without_flip_average": "test, no flip average", "validation_querybank": "validation, querybank",
              "test_querybank": "test, querybank-normalised"}
CARD_ROWS = ("before_training", "validation", "test", "test_querybank")


def export(model, processor, metrics: dict, args: tuple, history: list) -> None:
    """Save the final model (merged, so it loads without peft), processor, metrics, options, logs and card."""
    model_args, data_args, train_args = args
    out = train_args.output_dir
    staging = os.path.join(out, ".export.tmp")  # written whole, then moved in: a crash never leaves half a model
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    lora_towers = tuple(adapter_towers(model.config))
    adapters = False
    if lora_towers and train_args.save_adapters:
        outside = model.trained_outside_adapters()
        if outside:
            logger.warning("no adapters-only copy: %d trained parameters are not adapters or heads (e.g. %s); the "
                           "exported model holds everything.", len(outside), outside[0])
        else:
            save_adapters(model, os.path.join(staging, "adapters"))
            adapters = True
    model.merge_adapters()
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    for name, content in (("metrics.json", metrics), ("log_history.json", history),
                          (TRAINING_ARGS_FILE, all_options(args))):
        with open(os.path.join(staging, name), "w") as handle:
            json.dump(content, handle, indent=2)
    split = next((split for split in ("test", "validation") if metrics.get(split)), None)  # the card's model-index
    write_model_card(staging, model_config=model.config, args=args, location=out,
                     metrics={TABLE_ROWS[key]: metrics[key] for key in CARD_ROWS if metrics.get(key)},
                     results=(split, metrics[split]) if split else None, lora_towers=lora_towers, adapters=adapters)
    move_into(staging, out, last="metrics.json")
    table = {row: metrics[key] for key, row in TABLE_ROWS.items() if metrics.get(key)}
    if table:  # a run without validation or test split (a stream without --validation_file) has none
        print("\n" + format_metrics_table(table) + "\n", flush=True)
    logger.info("saved the model, processor, metrics.json, training_args.json and README.md in %s", out)
