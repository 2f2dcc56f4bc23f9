"""Early stopping on the held-out loss (`train.early_stopping`), decided from the Trainer's log alone.

The patience counter is not kept in a callback's memory: it is recomputed from `state.log_history` (the
eval_loss entries), which every checkpoint's trainer_state.json carries. So a crashed run resumes with the
counter it had, and a rerun of a run that stopped early sees from its last checkpoint that it is done.
"""

from __future__ import annotations

from collections.abc import Iterable


def stalled_evaluations(log_history: Iterable[dict], min_delta: float) -> int:
    """Evaluations in a row, up to the last one, whose eval_loss was not more than min_delta below the best so far
    (the best moves only on such an improvement, as in Keras, so slow creeping gains still add up)."""
    best, stalled = None, 0
    for entry in log_history:
        loss = entry.get("eval_loss")
        if loss is None:
            continue
        if best is None or loss < best - min_delta:
            best, stalled = loss, 0
        else:
            stalled += 1
    return stalled


def stopped_early(log_history: Iterable[dict], es) -> bool:
    """Whether a training with this `train.early_stopping` config has run out of patience."""
    return es.enabled and stalled_evaluations(log_history, es.min_delta) >= es.patience


def stop_reason(state, t) -> str:
    """Why a finished training ended, for train_summary.json: early stopping before the budget ran out, or the
    budget (patience running out on the budget's last step counts as the budget)."""
    before_the_end = not state.max_steps or state.global_step < state.max_steps
    if before_the_end and stopped_early(state.log_history, t.early_stopping):
        return f"early stopping: no improvement in {t.early_stopping.patience} evaluations"
    return "max_steps" if t.max_steps > 0 else "num_train_epochs"


def early_stopping(es):
    """A TrainerCallback that ends training once `es.patience` evaluations in a row brought no improvement."""
    from transformers import TrainerCallback

    class EarlyStopping(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            if stopped_early(state.log_history, es):  # the Trainer logged this evaluation before calling us
                control.should_training_stop = True
            return control

    return EarlyStopping()
