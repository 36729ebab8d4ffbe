"""The CLI end to end on a tiny random-init Llama, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from coreselect.__main__ import main


def _select(tiny_model_dir, pool, target, out, *extra):
    return main(
        [
            "select",
            "--model",
            str(tiny_model_dir),
            "--pool",
            str(pool),
            "--target",
            str(target),
            "--out",
            str(out),
            "--warmup",
            "none",
            "--layers",
            "2",
            "--no-progress",
            *extra,
        ]
    )


def test_select_writes_every_output(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "run"
    assert _select(tiny_model_dir, pool, target, out, "--budget", "3") == 0
    names = {p.name for p in out.iterdir()}
    assert {"coreset.jsonl", "scores.parquet", "fingerprints.safetensors", "run.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == ["index", "id", "source", "n_tokens", "n_scored", "score", "rank", "selected"]
    assert table.num_rows == 8 and sum(table.column("selected").to_pylist()) == 3
    ranked = table.sort_by("rank").to_pylist()
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    pool_rows = {json.loads(line)["id"]: json.loads(line) for line in pool.read_text().splitlines()}
    coreset = [json.loads(line) for line in (out / "coreset.jsonl").read_text().splitlines()]
    assert [r["id"] for r in coreset] == [r["id"] for r in ranked[:3]]  # best first
    assert all(r == pool_rows[r["id"]] for r in coreset)  # verbatim
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["pool"] == 8 and run["counts"]["selected"] == 3
    assert run["settings"]["layers"] == 2 and "torch" in run["versions"]
    assert run["stats"]["stage2"]["tokens_per_s"] > 0
    assert run["cost"]["forward_passes"] == 8 + 2 and run["cost"]["backward_passes"] == 0
    assert run["cost"]["peak_memory_mb"] > 0 and run["cost"]["wall_s"] > 0


def test_fingerprint_then_score_equals_select(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    assert _select(tiny_model_dir, pool, target, tmp_path / "a", "--budget", "50%") == 0
    assert (
        main(
            [
                "fingerprint",
                "--model",
                str(tiny_model_dir),
                "--target",
                str(target),
                "--out",
                str(tmp_path / "fp"),
                "--warmup",
                "none",
                "--layers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "score",
                "--model",
                str(tiny_model_dir),
                "--pool",
                str(pool),
                "--fingerprints",
                str(tmp_path / "fp" / "fingerprints.safetensors"),
                "--out",
                str(tmp_path / "b"),
                "--warmup",
                "none",
                "--budget",
                "50%",
                "--no-progress",
            ]
        )
        == 0
    )
    a = pq.read_table(tmp_path / "a" / "scores.parquet").column("score").to_numpy()
    b = pq.read_table(tmp_path / "b" / "scores.parquet").column("score").to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_file_keys_equal_flags_and_flags_override(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\npool: [{pool}]\ntarget: [{target}]\nbudget: 2\n"
        "warmup: none\nlayers: 2\nbatch-tokens: 64\nprogress: false\n"
    )
    assert main(["select", "--config", str(cfg), "--out", str(tmp_path / "o"), "--budget", "4"]) == 0
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["settings"]["batch_tokens"] == 64 and run["counts"]["selected"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--budget", "9"], "larger than the pool"),
        (["--budget", "0"], "budget must be positive"),
        (["--budget", "0%"], "must be in (0%, 100%]"),
        (["--scope", "middle"], "scope must be all, prompt or response"),
    ],
)
def test_bad_settings_fail_early_with_one_line(tiny_model_dir, small_pool, tmp_path, capsys, extra, message):
    pool, target = small_pool
    assert _select(tiny_model_dir, pool, target, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_inputs_and_existing_output(tiny_model_dir, small_pool, tmp_path, capsys):
    pool, target = small_pool
    assert _select(tmp_path / "no-model", pool, target, tmp_path / "x") == 2
    assert "no-model: no such model folder" in capsys.readouterr().err
    assert _select(tiny_model_dir, tmp_path / "nope.jsonl", target, tmp_path / "x") == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _select(tiny_model_dir, pool, empty, tmp_path / "y") == 2
    assert "target set is empty" in capsys.readouterr().err
    assert _select(tiny_model_dir, empty, target, tmp_path / "z") == 2
    assert "pool is empty" in capsys.readouterr().err
    out = tmp_path / "done"
    assert _select(tiny_model_dir, pool, target, out, "--budget", "2") == 0
    assert _select(tiny_model_dir, pool, target, out, "--budget", "2") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _select(tiny_model_dir, pool, target, out, "--budget", "2", "--overwrite") == 0


def test_bad_record_names_file_line_field_and_skip_writes_rejects(tiny_model_dir, small_pool, tmp_path, capsys):
    pool, target = small_pool
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pool.read_text() + '{"id": "x", "messages": []}\n')
    assert _select(tiny_model_dir, bad, target, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:9" in err and "messages" in err
    assert not (tmp_path / "e" / "coreset.jsonl").exists()
    assert _select(tiny_model_dir, bad, target, tmp_path / "s", "--on-bad-record", "skip", "--budget", "2") == 0
    assert f"1 bad record(s) skipped -> {tmp_path / 's'}/rejects.jsonl" in capsys.readouterr().out
    rejects = [json.loads(line) for line in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 9
    assert json.loads((tmp_path / "s" / "run.json").read_text())["counts"]["rejected"] == 1


@pytest.mark.parametrize("method", ["trim", "bm25"])
def test_skip_repeated_id_keeps_pool_numbering(method, tiny_model_dir, small_pool, tmp_path):
    """A record whose id repeats is rejected once, by every reader of the pool: the scores, the
    coreset and the rejects agree (reading it again must not shift the indices after it)."""
    pool, target = small_pool
    lines = pool.read_text().splitlines()
    dup = json.loads(lines[5])
    dup["id"] = json.loads(lines[1])["id"]
    bad = tmp_path / "dup.jsonl"
    bad.write_text("\n".join([*lines[:5], json.dumps(dup), *lines[6:]]) + "\n")
    out = tmp_path / method
    args = ["--on-bad-record", "skip", "--budget", "3", "--method", method, "--no-progress"]
    args += ["--model", str(tiny_model_dir), "--warmup", "none", "--layers", "2"] if method == "trim" else []
    assert main(["select", "--pool", str(bad), "--target", str(target), "--out", str(out), *args]) == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(6, "id")]
    table = pq.read_table(out / "scores.parquet")
    assert table.num_rows == len(lines) - 1
    kept = [json.loads(line)["id"] for i, line in enumerate(lines) if i != 5]
    assert table.column("id").to_pylist() == kept  # index i is the i-th record kept
    chosen = table.filter(table.column("selected")).column("id").to_pylist()
    coreset = [json.loads(line)["id"] for line in (out / "coreset.jsonl").read_text().splitlines()]
    assert sorted(coreset) == sorted(chosen)


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_template_refusal_stops_before_the_model_loads(
    on_bad, tiny_model_dir, small_pool, tmp_path, capsys, monkeypatch
):
    """A chat template that refuses a turn order (here: system turns, as some do) fails the run
    at the scan, naming the first such record, for both --on-bad-record modes."""
    from conftest import system_refusing_model

    from coreselect.models import loading

    model = system_refusing_model(tiny_model_dir, tmp_path / "model")
    pool, target = small_pool
    lines = pool.read_text().splitlines()
    rec = json.loads(lines[4])
    rec["messages"].insert(0, {"role": "system", "content": "Be brief."})
    bad = tmp_path / "sys.jsonl"
    bad.write_text("\n".join([*lines[:4], json.dumps(rec), *lines[5:], json.dumps(rec | {"id": "again"})]) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_model", no_model)
        assert _select(model, bad, target, tmp_path / "out", "--on-bad-record", on_bad) == 2
    err = capsys.readouterr().err
    assert f"{bad}:5: field 'messages': chat template failed" in err and "System role not supported" in err
    assert "turns system, user, assistant: 2 record(s)" in err
    assert not (tmp_path / "out" / "coreset.jsonl").exists()
    # without the system turn, the same template renders every record: the run goes on
    assert _select(model, pool, target, tmp_path / "ok", "--budget", "2") == 0


def test_resume_after_lost_shards_gives_identical_outputs(tiny_model_dir, small_pool, tmp_path):
    pool, target = small_pool
    out = tmp_path / "r"
    assert _select(tiny_model_dir, pool, target, out, "--budget", "3", "--shard-records", "3") == 0
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 3
    ref_scores = (out / "scores.parquet").read_bytes()
    ref_coreset = (out / "coreset.jsonl").read_text()
    shards[-1].unlink()  # as if killed while scoring the last shard
    (out / "scores.parquet").unlink()
    (out / "coreset.jsonl").unlink()
    assert _select(tiny_model_dir, pool, target, out, "--budget", "3", "--shard-records", "3", "--resume") == 0
    assert json.loads((out / "run.json").read_text())["counts"]["resumed_shards"] == 2
    assert (out / "coreset.jsonl").read_text() == ref_coreset
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(__import__("io").BytesIO(ref_scores)))


@pytest.mark.parametrize("method", ["random", "bm25", "dsir"])
def test_baselines_share_the_outputs(small_pool, tmp_path, method):
    pool, target = small_pool
    out = tmp_path / method
    assert (
        main(
            [
                "select",
                "--method",
                method,
                "--pool",
                str(pool),
                "--target",
                str(target),
                "--out",
                str(out),
                "--budget",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert len((out / "coreset.jsonl").read_text().splitlines()) == 2
    assert pq.read_table(out / "scores.parquet").num_rows == 8


def test_every_command_has_working_help(capsys):
    from coreselect.__main__ import parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    assert {
        "select",
        "fingerprint",
        "score",
        "compare",
        "demo",
        "merge",
        "train",
        "eval",
        "experiment",
        "heads",
        "report",
        "explain",
    } <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: coreselect " + name in capsys.readouterr().out


def test_python_api_select_with_keywords(tiny_model_dir, small_pool, tmp_path):
    import coreselect
    import coreselect.api  # importing submodules must not shadow coreselect.select

    pool, target = small_pool
    info = coreselect.select(
        pool=[str(pool)],
        target=[str(target)],
        out=str(tmp_path / "api"),
        budget="2",
        model=str(tiny_model_dir),
        warmup="none",
        layers=2,
        progress=False,
    )
    assert info["counts"]["selected"] == 2 and (tmp_path / "api" / "coreset.jsonl").exists()
    with pytest.raises(coreselect.errors.ConfigError, match="unknown key"):
        coreselect.select(pool=[str(pool)], out=str(tmp_path / "x"), bogus=1)


def test_method_options_are_flat_flags_of_the_chosen_method(small_pool, tmp_path):
    import json

    pool, target = small_pool
    out = tmp_path / "bm25"
    assert (
        main(
            [
                "select",
                "--method",
                "bm25",
                "--k1",
                "0.9",
                "--scope",
                "prompt",
                "--pool",
                str(pool),
                "--target",
                str(target),
                "--out",
                str(out),
                "--budget",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["method_settings"]["k1"] == 0.9 and run["method_settings"]["scope"] == "prompt"
    assert run["settings"]["k1"] == 0.9  # settings hold the method's options, flat


def test_select_help_groups_flags_by_concern_with_only_the_chosen_methods_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["select", "--method", "bm25", "--help"])
    text = capsys.readouterr().out
    heads = ["\ninputs and outputs", "\nbm25 options:", "\nformatting:", "\nwarmup:", "\nengine:", "\nrun control:"]
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    body = text[text.index("\ninputs and outputs") :]
    assert body.index("--pool") < body.index("--k1") < body.index("--warmup ") < body.index("--engine")
    assert "--layers LAYERS" not in text and "example:" in text
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    text = capsys.readouterr().out
    assert "trim options" in text and "--layers LAYERS" in text and "--k1 K1" not in text


def test_cli_stderr_has_no_library_debug_lines(small_pool, tmp_path):
    """bm25s sets its own logger to DEBUG; without -v the CLI shows warnings and errors only."""
    import subprocess
    import sys

    pool, target = small_pool
    cmd = [sys.executable, "-m", "coreselect", "select", "--method", "bm25", "--pool", str(pool)]
    cmd += ["--target", str(target), "--out", str(tmp_path / "b"), "--budget", "2", "--no-progress"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "DEBUG" not in quiet.stderr and "selected 2 of 8" in quiet.stdout
    loud = subprocess.run([*cmd[:3], "-v", *cmd[3:], "--overwrite"], capture_output=True, text=True, check=True)
    assert "DEBUG" in loud.stderr  # -v still shows them
