"""Downstream evaluation: fine-tune a saved encoder for sentence classification, a few seeds, median reported.

`evaluate(model_dir, cfg)` loads the task's examples (`LOADERS`, by `downstream.kind`), and for
each seed fine-tunes a fresh copy of the model with a new classification head
(AutoModelForSequenceClassification: a new pooler and classifier on the trained encoder, also
where the checkpoint has a pooler), then scores it. The protocol, as in cramming's GLUE eval (a few short fine-tunes, the median kept):

- AdamW at downstream.lr (mlm.optim's parameter groups: no decay on biases and norms; weight decay
  0.01, betas 0.9/0.98), linear decay after a 10% warmup, gradients clipped at 1.0, fp32, the
  model's own dropout; downstream.epochs (polarity: 10) over the training examples in batches of
  downstream.batch_size, each example cut to downstream.max_length tokens (pairs together).
- polarity and local files: stratified k-fold cross-validation (downstream.folds, the folds fixed
  by FOLD_SEED): every example is scored once per seed by the model that did not train on it, and
  the accuracy is over all of them. hub (GLUE): train on train_split, score eval_split.
- A seed fixes the head's initial weights, the batch order and dropout: a rerun on the same device
  gives the same numbers (bitwise on CPU; GPU kernels may differ in the last bits).

The noise this leaves: polarity has 200 examples (100 neg, 100 pos), so one accuracy has a
binomial standard error of sqrt(p(1 - p) / 200), about 3.2 points at 70% accuracy (3.5 at 50%),
before the seed-to-seed spread of the fine-tunes (docs/downstream.md measures both): two encoders
closer than ~5 points on polarity are not told apart by it.

`python -m mlm.downstream <model dir> downstream=polarity [downstream.seeds=[0,1] ...]` (__main__.py)
runs it on any saved model (a run's final/, or package:<module>/<subdir>) and prints the result as JSON.
After MLM training, train() runs it on the run's final/ when downstream.kind is not none.

tasks.py     a task's examples and its (train, eval) splits
protocol.py  fine-tune, score, the median over seeds (`evaluate`)
runs.py      a finished run asked for downstream numbers it lacks (`add_to_finished_run`)
"""

from mlm.downstream.protocol import evaluate, summary_line
from mlm.downstream.runs import add_to_finished_run
from mlm.downstream.tasks import task_name, task_splits

__all__ = ["add_to_finished_run", "evaluate", "summary_line", "task_name", "task_splits"]
