"""`jestcurate eval`: train one recipe on the uniform pool and on each selection, and compare
them on evaluation sets as training goes.

config (recipe, scales, arms, checks), streams (each arm's batches), units (one arm x seed
trained and evaluated), results (the comparison, its table and plot), job (run), sets (the
evaluation sets: clip_benchmark zero-shot, image-text retrieval, and their metrics).
"""

from jestcurate.pipelines.evaluate.sets import (
    EvalData,
    EvalSet,
    evaluate,
    load,
    open_eval_set,
    primary_metric,
)

__all__ = ["EvalData", "EvalSet", "evaluate", "load", "open_eval_set", "primary_metric"]
