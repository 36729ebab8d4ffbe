"""``coreselect experiment``'s driver: :func:`experiment` runs the stages in priority order."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coreselect.errors import CoreselectError
from coreselect.experiment.args import ExperimentArgs
from coreselect.experiment.layout import (
    pool_questions,
    pretrained_dir,
    read_stage,
    resolve_data,
    say,
    setting_pools,
    setting_root,
)
from coreselect.experiment.results import write_all
from coreselect.experiment.stages import (
    estimate_full_sft,
    run_eval,
    run_full_data,
    run_pilot,
    run_rows,
    run_warmup,
)
from coreselect.io import write_json

log = logging.getLogger("coreselect")


def experiment(args: ExperimentArgs) -> dict[str, Any]:
    """Run (or resume) the whole protocol; write ``results.md`` / ``results.csv``; return a summary.

    Stages run in priority order, so that an interrupted run leaves a balanced partial table:
    the pilot, the Pretrained row, then per setting its selections and, seed by seed, every
    method's training and evaluation, and the Full-data row last. Each stage is cached.
    """
    t0 = time.perf_counter()
    args.validate()
    out = Path(args.out)
    pool, targets = resolve_data(args)
    pools = setting_pools(args, pool)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg = asdict(args)
    old = read_stage(cfg_path)
    if old is not None:
        changed = sorted(k for k in cfg if old.get(k) != cfg[k] and k not in ("progress",))
        if changed:
            log.warning(
                "settings changed since the previous run in %s (%s); cached stages keep their old "
                "outputs (delete them to redo)",
                out,
                ", ".join(changed),
            )
            say(f"note: settings changed since the previous run ({', '.join(changed)}); cached stages are reused")
    write_json(cfg_path, cfg)

    pilot = run_pilot(args, pool, targets, out) if args.pilot else None
    if args.pilot_from:
        pilot = read_stage(Path(args.pilot_from).expanduser())
        if pilot is None or "chosen" not in pilot:
            raise CoreselectError(f"{args.pilot_from}: no pilot.json with a chosen recipe (run its experiment first)")
    if pilot is not None:
        args.train = {**args.train, **pilot["chosen"]}
    loaded: dict[str, Any] = {}
    # one decontamination set for every setting (the in-domain pool holds the others): the
    # test items are then the same in every table
    seen = pool_questions(pool) if args.decontaminate else None
    if args.include_pretrained and not args.select_only:
        for task, target in targets.items():
            run_eval(args, task, target, None, pretrained_dir(args, task), loaded, seen)
    for setting in pools:
        setting_root(args, setting).mkdir(parents=True, exist_ok=True)
    warmups = {setting: run_warmup(args, spool, setting_root(args, setting)) for setting, spool in pools.items()}
    for seed in args.seeds:  # seed-major: every setting's rows get their first seed before any its second
        for setting, spool in pools.items():
            run_rows(args, setting, spool, targets, warmups[setting], seed, loaded, seen)
            write_all(args, targets, pools, t0, pilot)  # a partial table after each seed and setting
    if args.include_full_data and not args.select_only:
        for setting, spool in pools.items():
            run_full_data(args, setting, spool, targets, loaded, seen)
    full_sft = estimate_full_sft(args, pool, out, loaded) if not args.select_only else None
    info = write_all(args, targets, pools, t0, pilot, full_sft)
    say(f"done in {info['wall_s']:.0f} s -> {out / 'results.md'}")
    return info
