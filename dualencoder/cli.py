"""The console commands `pip install -e .` puts on the PATH (pyproject.toml's [project.scripts]).

Each is a module's `main`, run for its effect: the mains return their results (for tests and notebooks), which a
shell must not take as an exit status. Modules are imported only when their command runs.
"""

from __future__ import annotations

import importlib


def _command(module: str):
    def run() -> None:
        importlib.import_module(module).main()

    run.__doc__ = f"python -m {module}"
    return run


train = _command("run_contrastive")
evaluate = _command("dualencoder.evaluation.evaluate_model")
rerank_train = _command("dualencoder.rerank.train")
figures = _command("dualencoder.evaluation.figures")
report = _command("dualencoder.evaluation.report")
score = _command("dualencoder.evaluation.scoring")
human_judgments = _command("dualencoder.evaluation.human_judgments")
baselines = _command("dualencoder.baselines.compare")
index = _command("dualencoder.apps.index")
query = _command("dualencoder.apps.query")
serve = _command("dualencoder.apps.serve")
classify = _command("dualencoder.apps.classify")
export = _command("dualencoder.apps.export")
push = _command("dualencoder.training.publish")
