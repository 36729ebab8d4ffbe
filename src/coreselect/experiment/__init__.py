"""``coreselect experiment``: the paper's protocol end to end (§4.1, App. E-F, Table 1).

For every target task: select a coreset with each method and budget, fine-tune a fresh
copy of the base model with LoRA on it once per seed, evaluate it on the task with
lm-eval (``coreselect eval``), and tabulate the task's headline metric as "mean (std)" over
seeds with a macro average, plus the rows *Pretrained* (no fine-tuning) and *Full-data*
(fine-tuned on the whole pool). With ``heldout:`` files, each evaluation also reports the
held-out target loss (LESS's cheap signal, :mod:`coreselect.eval.heldout`), tabulated as a
"{task} loss" column.

Rows come from the methods (:meth:`~coreselect.methods.base.SelectionMethod.experiment_rows`):
every method adds its plain row, and P2D adds three (paper 003): ``p2d`` selects with
``--method p2d`` and trains only the task-sensitive heads ``H_T`` (``train --heads``);
``p2d_select`` (P2D-dagger) trains LoRA on the p2d coreset; ``p2d_train``
(P2D-double-dagger) trains the heads on the Random row's coreset (same budget and seed,
so it differs from Random by the training only). P2D selections always score with the
base model (``warmup: none``: the paper locates heads on the base model). The heads of a
heads-only run are the ``heads.json`` that the p2d selection of the same task and budget
saved (for ``p2d_train`` that selection is run too, cached like any other), so P2D-double-
dagger is exactly P2D with its data swapped for random data. Heads-only runs are
evaluated by adding ``heads_delta.safetensors`` onto a fresh base model.

Every fine-tuned row gets an AER (paper 003's Alignment Efficiency Ratio, lower is better)::

    AER = (Select (s) / n_tasks + Train (s)) / full-data full-parameter SFT wall time

i.e. one task's selection (the shared warmup amortized over the tasks) plus one training
run. The Full-data row trains LoRA, so the denominator is estimated once per experiment
(:func:`~coreselect.experiment.stages.estimate_full_sft`, cached in ``full_sft.json`` and recorded
in ``experiment.json``).

Layout of ``out`` (every stage is skipped when its output is complete and newer than its
input: a training is redone when its coreset was rewritten, an evaluation when its adapter
was; so a re-run resumes where the previous one stopped, and interrupted selections and
trainings continue from their own shards / checkpoints)::

    data/                                  the embedded pool and targets (``pool: embedded``)
    warmup/adapter/                        ONE LoRA warmup (model-based methods), shared by all tasks
    full/train/full-s{seed}/               full-data fine-tuning (task independent)
    {task}/select/{method}-{budget}/       coreset.jsonl, scores.parquet, run.json
    {task}/train/{method}-{budget}-s{seed}/adapter/ (or heads_delta.safetensors), run.json
    {task}/eval/{name}/eval.json           name: pretrained, full-s{seed}, {method}-{budget}-s{seed}
                                           (+ lm-eval's lm_eval_results.json, samples_*.jsonl, heldout.jsonl)
    full_sft.json                          the estimated full-parameter SFT time (AER denominator)
    results.md, results.csv, experiment.json

The package, one concern a module: :mod:`~coreselect.experiment.args` (the arguments and the rows
they stand for), :mod:`~coreselect.experiment.layout` (inputs, folders, shared helpers),
:mod:`~coreselect.experiment.stages` (the cached stages), :mod:`~coreselect.experiment.run` (the
driver, :func:`experiment`), :mod:`~coreselect.experiment.results` (what the files on disk add up
to) and :mod:`~coreselect.experiment.tables` (results.md / results.csv).
"""

from __future__ import annotations

from coreselect.experiment.args import ExperimentArgs
from coreselect.experiment.results import collect_results
from coreselect.experiment.run import experiment
from coreselect.experiment.tables import write_results

__all__ = ["ExperimentArgs", "collect_results", "experiment", "write_results"]
