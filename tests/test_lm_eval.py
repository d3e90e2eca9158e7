"""lm-eval as users run it: the MGSM tasks of eval/lm_eval/ score what they say, and the
harness's own API models evaluate the demo server on loopback through /v1/chat/completions
(generation) and /v1/completions (generation and loglikelihood)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from tests.conftest import MGSM_DIR, REPO
from tests.serving import demo_config, running_server, scrape, value

TASKS = REPO / "eval" / "lm_eval"
LIMIT = 3


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    """The tasks read data/mgsm/ relative to the working directory, as from a checkout."""
    monkeypatch.chdir(REPO)


def mgsm_answers(lang: str) -> dict[str, str]:
    """Question → answer as the TSV writes it, thousands separators dropped."""
    rows = (MGSM_DIR / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines()
    return dict((q, a.replace(",", "")) for q, a in (row.split("\t") for row in rows))


class ScriptedModel(LM):
    """Outputs fixed by the test, so that what is under test is the tasks' scoring."""

    def __init__(self, replies: dict[str, str] | None = None, loglikelihood=None):
        super().__init__()
        self.replies, self.score = replies or {}, loglikelihood

    def generate_until(self, requests):
        return [self.replies[request.doc["question"]] for request in requests]

    def loglikelihood(self, requests):
        return [(self.score(request.doc["question"], request.args[1]), False) for request in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def evaluate(model: LM | str, task: str, **options) -> dict:
    """lm-eval's Python API on the repository's tasks only (no index of lm-eval's own)."""
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    unseeded = {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}  # the session's RNGs
    return simple_evaluate(model=model, tasks=[task], task_manager=manager, bootstrap_iters=0, **unseeded, **options)


def test_generation_task_scores_the_last_number_of_the_output_without_thousands_separators():
    questions = list(mgsm_answers("sw"))
    rows = {
        0: "16 - 3 - 4 = 9 mayai, 9 * 2 = 18.",  # answer 18, sentence period
        1: "2 + 1 = 3.0",  # answer 3
        2: "Faida ni $70,000",  # answer 70000
        146: "2125",  # answer written 2,125 in the TSV
        201: "114,200, si 114,199.",  # answer 114,200 but the last number is wrong
        230: "Sijui.",  # no number at all
    }
    replies = {questions[row]: text for row, text in rows.items()}
    results = evaluate(ScriptedModel(replies), "modserve_mgsm_sw", samples={"modserve_mgsm_sw": list(rows)})
    assert results["results"]["modserve_mgsm_sw"]["exact_match,last_number"] == pytest.approx(4 / 6)
    extracted = {s["doc_id"]: s["filtered_resps"][0] for s in results["samples"]["modserve_mgsm_sw"]}
    assert extracted == {0: "18", 1: "3.0", 2: "70,000", 146: "2125", 201: "114,199", 230: "[invalid]"}


def test_choice_task_offers_each_answer_among_other_mgsm_answers_at_chance_for_a_blind_scorer():
    answers = mgsm_answers("ja")
    offered = []

    def knows_the_answer(question: str, continuation: str) -> float:
        offered.append((question, continuation))
        return 0.0 if continuation == " " + answers[question] else -1.0

    knowing = evaluate(ScriptedModel(loglikelihood=knows_the_answer), "modserve_mgsm_choice_ja")
    assert knowing["results"]["modserve_mgsm_choice_ja"]["acc,none"] == 1.0
    assert len(offered) == 4 * 250 and len(set(offered)) == 4 * 250  # four distinct numbers a problem
    shortest = ScriptedModel(loglikelihood=lambda _, continuation: -len(continuation))  # ignores the question
    blind = evaluate(shortest, "modserve_mgsm_choice_ja")
    assert 0.2 < blind["results"]["modserve_mgsm_choice_ja"]["acc,none"] < 0.3


@pytest.fixture(scope="module")
def server(demo):
    with running_server(demo_config(demo, engine={"max_model_len": 2048})) as running:
        yield running


def lm_eval_completions(model_args: list[str], tasks: list[str], out) -> dict:
    """`lm-eval run --model local-completions` in a child process started offline: no
    tokenizer or dataset may come from a hub."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(out / "datasets")}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", *model_args,
               "--include_path", str(TASKS), "--tasks", *tasks, "--limit", str(LIMIT),
               "--gen_kwargs", "max_gen_toks=8", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **offline}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in tasks}
    return {**results, "samples": samples}


def served(before, after, endpoint: str, language: str) -> float:
    labels = {"endpoint": endpoint, "language": language, "status": "200"}
    return value(after, "modserve_requests_total", **labels) - value(before, "modserve_requests_total", **labels)


def test_lm_eval_chat_generation_against_the_resident_alone(server):
    before = scrape(server)
    chat = {"model": "modserve:resident", "base_url": f"{server.base_url}/chat/completions", "num_concurrent": 2}
    run = evaluate("local-chat-completions", "modserve_mgsm_sw", model_args=chat, apply_chat_template=True,
                   limit=LIMIT, gen_kwargs={"max_gen_toks": 8})
    assert 0.0 <= run["results"]["modserve_mgsm_sw"]["exact_match,last_number"] <= 1.0
    assert all(isinstance(s["resps"][0][0], str) for s in run["samples"]["modserve_mgsm_sw"])
    assert served(before, scrape(server), "chat", "resident") == LIMIT


def test_lm_eval_completions_generation_and_loglikelihood_with_automatic_routing(server, demo, tmp_path):
    before = scrape(server)
    model_args = ["model=modserve", f"base_url={server.base_url}/completions", "tokenizer_backend=huggingface",
                  f"tokenizer={demo.resident}", "num_concurrent=2", "max_length=2048"]
    run = lm_eval_completions(model_args, ["modserve_mgsm_sw", "modserve_mgsm_choice_sw"], tmp_path)
    assert 0.0 <= run["results"]["modserve_mgsm_sw"]["exact_match,last_number"] <= 1.0
    choice = run["results"]["modserve_mgsm_choice_sw"]
    assert 0.0 <= choice["acc,none"] <= 1.0 and 0.0 <= choice["acc_norm,none"] <= 1.0
    loglikelihoods = [float(resp[0][0]) for s in run["samples"]["modserve_mgsm_choice_sw"] for resp in s["resps"]]
    assert len(loglikelihoods) == 4 * LIMIT and all(ll < 0 for ll in loglikelihoods)
    assert served(before, scrape(server), "completions", "sw") == LIMIT + 4 * LIMIT  # the Swahili pack, detected
