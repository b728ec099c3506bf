"""`jestcurate eval`: train one recipe on the pool and on each selection, evaluating as it goes.

sets: the evaluation sets (clip_benchmark zero-shot, image-text retrieval) and their metrics.
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
