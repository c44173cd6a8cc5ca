"""LLM judges backed by real models (stages/reward/judge*.py) and the scorer (stages/rollout/scorer.py).

HFScorer / HFJudge run the tiny Qwen2 policy built locally (real transformers forwards); the
OpenAI-compatible judge is tested against a small HTTP server started here (the scripted server
is the test double of the endpoint, nothing else is mocked)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from stages.reward.judge import check_judge_config, judge_overhead, make_judge, usage
from stages.reward.judge_hf import HFJudge
from stages.reward.judge_openai import JudgeEndpointError, OpenAIJudge
from stages.reward.judge_prompts import correction_prompt, step_prompt
from stages.rollout.scorer import HFScorer
from stages.rollout.config import ModelConfig
from stages.rollout.policy import build_tiny_policy
from stages.schema import Batch, Trajectory, Turn

SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _corpus() -> list[str]:
    out = []
    for a in range(1, 9):
        for b in range(1, 9):
            ok = (a + b) % 3 != 0
            out.append(step_prompt(f"{a}+{b}*2", [f"{b}*2={2 * b}"], f"{a}+{2 * b}={a + 2 * b + (0 if ok else 1)}")
                       + (" yes\n" if ok else " no\n"))
            out.append(f"{a}+{b}\n{a}+{b}={a + b}\nanswer {a + b}\n")
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_policy(ModelConfig(**SMALL), _corpus())


def math_batch(tok, episodes) -> Batch:
    """Math-family-shaped trajectories: prompt = problem + newline, one reasoning line per turn,
    empty observations. ``episodes``: list of (problem, [step lines], reward, group_id)."""
    trajs = []
    for i, (problem, steps, reward, gid) in enumerate(episodes):
        prompt_text = problem + "\n"
        ids, turns = [], []
        for k, s in enumerate(steps):
            a = len(ids)
            ids += tok(s + "\n", add_special_tokens=False)["input_ids"]
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)),
                              action_text=s, observation=""))
        n = len(ids)
        trajs.append(Trajectory(uid=f"t{i}", group_id=gid, task_id=f"task{gid}", env_name="math",
                                prompt_ids=tok(prompt_text, add_special_tokens=False)["input_ids"], response_ids=ids,
                                policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns,
                                reward=float(reward), success=reward > 0, prompt_text=prompt_text))
    return Batch(trajs)


EPISODES = [
    ("3+4*2", ["4*2=8", "3+8=11", "answer 11"], 1.0, 0),
    ("3+4*2", ["3+4=7", "7*2=14", "answer 14"], 0.0, 0),
    ("5+1", ["answer 6"], 1.0, 1),
    ("5+1", ["5+1=7", "answer 7"], 0.0, 1),
]


# --------------------------------------------------------------------------- HFScorer


def _direct_logprobs(model, context, target):
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    T = len(target)
    return logp[len(context) - 1 : len(context) - 1 + T].gather(-1, torch.tensor(target)[:, None]).squeeze(-1)


def test_scorer_matches_unpadded_forwards(tiny):
    model, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    contexts = [enc("3+4*2\n4*2=8\n"), enc("5+1\n"), enc("Problem: 7+1\nStep: 7+1=8\nAnswer:")]
    targets = [enc("3+8=11\n"), enc("answer 6\n"), enc(" yes")]
    scorer = HFScorer(model, pad_token_id=tok.pad_token_id, batch_size=2)
    got = scorer(contexts, targets)
    for c, t, g in zip(contexts, targets, got):
        assert g.shape == (len(t),)
        assert torch.allclose(g, _direct_logprobs(model, c, t), atol=1e-5)
    assert scorer.forward_passes == 2  # 3 sequences in chunks of 2
    with pytest.raises(ValueError, match=r"contexts\[0\] is empty"):
        scorer([[]], [[1]])


# --------------------------------------------------------------------------- HFJudge


def _direct_score(model, tok, prompt, yes, no):
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    lp = lambda w: _direct_logprobs(model, ctx, tok(w, add_special_tokens=False)["input_ids"]).sum()
    return torch.logsumexp(torch.stack([lp(w) for w in yes]), 0) - torch.logsumexp(torch.stack([lp(w) for w in no]), 0)


@pytest.mark.parametrize("words", [((" yes", " Yes"), (" no", " No")), ((" yes it is",), (" no it is not",))])
def test_hf_judge_verdict_is_the_yes_no_log_odds(tiny, words):
    model, tok = tiny
    yes, no = words
    batch = math_batch(tok, EPISODES)
    judge = HFJudge(model, tok, yes_words=yes, no_words=no, batch_size=4)
    v = judge.step_verdicts(batch)
    assert v.shape == (4, 3)
    assert torch.isnan(v[2, 1:]).all() and torch.isnan(v[3, 2]) and not torch.isnan(v[0]).any()
    for b, traj in enumerate(batch.trajectories):
        steps = [t.action_text for t in traj.turns]
        for k in range(len(steps)):
            s = _direct_score(model, tok, step_prompt(traj.prompt_text, steps[:k], steps[k]), yes, no)
            assert abs(float(judge.last_scores[b, k]) - float(s)) < 1e-4
            assert float(v[b, k]) == float(s > 0.0)
    assert judge.calls == 9  # one judged step = one call
    words_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in yes + no]
    n_seqs = 9 if all(len(w) == 1 for w in words_ids) else 9 * len(words_ids)
    assert judge.forward_passes == -(-n_seqs // 4)  # batched: chunks of batch_size=4 sequences
    # the threshold moves every verdict
    lo = float(judge.last_scores[~torch.isnan(judge.last_scores)].min())
    hi = float(judge.last_scores[~torch.isnan(judge.last_scores)].max())
    assert (HFJudge(model, tok, yes_words=yes, no_words=no, margin=hi + 1).step_verdicts(batch).nan_to_num(-1) <= 0).all()
    assert (HFJudge(model, tok, yes_words=yes, no_words=no, margin=lo - 1).step_verdicts(batch).nan_to_num(1) == 1).all()


def test_hf_judge_batch_size_does_not_change_verdicts(tiny):
    model, tok = tiny
    batch = math_batch(tok, EPISODES)
    one = dict(yes_words=(" yes",), no_words=(" no",))  # single tokens of the tiny tokenizer: the fast path
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in (" yes", " no"))
    j1, j9 = HFJudge(model, tok, batch_size=1, **one), HFJudge(model, tok, batch_size=9, **one)
    v1, v9 = j1.step_verdicts(batch), j9.step_verdicts(batch)
    assert torch.equal(v1.nan_to_num(-1), v9.nan_to_num(-1))
    assert torch.allclose(j1.last_scores.nan_to_num(0), j9.last_scores.nan_to_num(0), atol=1e-4)
    assert j1.forward_passes == 9 and j9.forward_passes == 1


def test_hf_judge_propose_is_greedy_generation_and_counted(tiny):
    model, tok = tiny
    judge = HFJudge(model, tok)
    prompt = correction_prompt("3+4*2\n", ["4*2=8"], "3+8=12")
    before = usage(judge)
    out = judge.propose([prompt, prompt], max_new_tokens=6)
    assert len(out) == 2 and out[0] == out[1]  # greedy: deterministic
    # the same greedy decode by hand, full forwards, stop at a newline token
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gen = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax())
            gen.append(nxt)
            if "\n" in tok.decode([nxt]) or nxt == tok.eos_token_id:
                break
    assert out[0] == tok.decode(gen, skip_special_tokens=True).strip()
    o = judge_overhead(judge, before)
    assert o.judge_calls == 2 and o.extra_tokens == 2 * len(gen) and o.extra_forward_passes == len(gen)


# --------------------------------------------------------------------------- make_judge


def test_make_judge_policy_and_local_dir(tiny, tmp_path):
    model, tok = tiny
    batch = math_batch(tok, EPISODES)
    pj = make_judge({"judge": "policy"}, policy=model, tokenizer=tok)
    assert isinstance(pj, HFJudge) and pj.model is model
    d = tmp_path / "judge-model"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    lj = make_judge({"judge": str(d), "judge_margin": 0.0})
    assert isinstance(lj, HFJudge) and lj.model is not model
    assert torch.equal(pj.step_verdicts(batch).nan_to_num(-1), lj.step_verdicts(batch).nan_to_num(-1))
    with pytest.raises(ValueError, match="live policy"):
        make_judge({"judge": "policy"})


def test_judge_config_errors_before_compute(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="credit.judge.*does not exist"):
        check_judge_config({"judge": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_judge({"judge": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="judge_url"):
        check_judge_config({"judge": "openai", "judge_model": "m"})
    monkeypatch.delenv("CF_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="CF_TEST_NO_SUCH_KEY"):
        check_judge_config({"judge": "openai", "judge_url": "http://127.0.0.1:9", "judge_model": "m",
                            "judge_api_key_env": "CF_TEST_NO_SUCH_KEY"})


# --------------------------------------------------------------------------- OpenAI-compatible endpoint

SECRET = "sk-test-not-a-real-key-42"


class _Endpoint:
    """A scripted OpenAI-compatible server (test double of the endpoint)."""

    def __init__(self, script=None):
        self.requests: list[dict] = []
        self.script = list(script or [])  # queued (status, delay) overrides for the next requests
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ep.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, delay = ep.script.pop(0) if ep.script else (200, 0.0)
                if delay:
                    time.sleep(delay)
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted failure"}')
                    return
                text = ep.reply(body)
                if self.path.endswith("/chat/completions"):
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                else:
                    choice = {"index": 0, "text": text}
                out = {"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # the timeout test hangs up on purpose
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def reply(body) -> str:
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        if "Correct next step:" in prompt:
            return " 3+8=11\nmore text"
        step = prompt.split("Step: ")[-1].split("\n")[0]
        lhs, rhs = step.split("=") if "=" in step else (None, None)
        if lhs is None:
            return "maybe"
        a, op, b = re.match(r"(\d+)\s*([-+*])\s*(\d+)", lhs).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        return " Yes." if value == int(rhs) else "No, it is wrong"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def endpoint():
    ep = _Endpoint()
    yield ep
    ep.close()


def _text_batch():
    eps = [("3+4*2", ["4*2=8", "3+8=11", "answer 11"], 1.0, 0), ("3+4*2", ["3+4=7", "7*2=15"], 0.0, 0)]
    trajs = []
    for i, (p, steps, r, g) in enumerate(eps):
        turns = [Turn(index=k, action_span=(k, k + 1), obs_span=(k + 1, k + 1), action_text=s, observation="")
                 for k, s in enumerate(steps)]
        n = len(steps)
        trajs.append(Trajectory(uid=f"x{i}", group_id=g, task_id="t", env_name="math", prompt_ids=[1],
                                response_ids=[5] * n, policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n,
                                turns=turns, reward=r, success=r > 0, prompt_text=p + "\n"))
    return Batch(trajs)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_openai_judge_verdicts_proposals_and_key_handling(endpoint, monkeypatch, api):
    monkeypatch.setenv("CF_TEST_JUDGE_KEY", SECRET)
    cfg = {"judge": "openai", "judge_url": endpoint.url, "judge_model": "critic-1",
           "judge_api_key_env": "CF_TEST_JUDGE_KEY", "judge_api": api}
    judge = make_judge(cfg)
    assert isinstance(judge, OpenAIJudge)
    v = judge.step_verdicts(_text_batch())
    # 4*2=8 yes, 3+8=11 yes, "answer 11" unparseable -> nan; 3+4=7 yes, 7*2=15 no, absent -> nan
    assert v.shape == (2, 3)
    assert v[0, :2].tolist() == [1.0, 1.0] and torch.isnan(v[0, 2])
    assert v[1, :2].tolist() == [1.0, 0.0] and torch.isnan(v[1, 2])
    assert judge.unparsed == 1 and judge.calls == 5
    assert judge.propose([correction_prompt("3+4*2\n", ["4*2=8"], "3+8=12")], 8) == ["3+8=11"]
    assert judge.calls == 6 and judge.prompt_tokens == 60 and judge.completion_tokens == 12
    o = judge_overhead(judge, {k: 0 for k in ("calls", "forward_passes", "prompt_tokens", "completion_tokens")})
    assert o.judge_calls == 6 and o.extra_tokens == 12
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    assert all(r["path"] == path and r["auth"] == f"Bearer {SECRET}" for r in endpoint.requests)
    assert all(r["body"]["model"] == "critic-1" for r in endpoint.requests)
    # the key is read from the environment at request time and lives nowhere on the object
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge)) and SECRET not in json.dumps(usage(judge))
    assert "CF_TEST_JUDGE_KEY" in repr(judge)


def test_openai_judge_retries_then_fails_clearly(monkeypatch):
    monkeypatch.setenv("CF_TEST_JUDGE_KEY", SECRET)
    ep = _Endpoint(script=[(503, 0.0), (500, 0.0)])
    try:
        judge = OpenAIJudge(ep.url, "m", api_key_env="CF_TEST_JUDGE_KEY", max_retries=2, backoff_s=0.01)
        assert judge.step_verdicts(_text_batch())[0, 0] == 1.0  # two 5xx, then success on the third attempt
        assert judge.retries == 2
        ep.script = [(401, 0.0)]
        with pytest.raises(JudgeEndpointError, match=r"HTTP 401.*CF_TEST_JUDGE_KEY") as e:
            judge.propose(["x"], 4)
        assert SECRET not in str(e.value)
        ep.script = [(500, 0.0)] * 3
        with pytest.raises(JudgeEndpointError, match=r"failed after 3 attempts.*HTTP 500") as e:
            judge.propose(["x"], 4)
        assert SECRET not in str(e.value)
        ep.script = [(200, 1.0)] * 2
        slow = OpenAIJudge(ep.url, "m", api_key_env="CF_TEST_JUDGE_KEY", timeout_s=0.2, max_retries=1, backoff_s=0.01)
        with pytest.raises(JudgeEndpointError, match=r"failed after 2 attempts \(timeout 0.2s each\)"):
            slow.propose(["x"], 4)
    finally:
        ep.close()


def test_openai_judge_without_auth_and_unreachable():
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="", max_retries=0, timeout_s=2.0)
    assert judge.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(JudgeEndpointError, match="127.0.0.1:9/v1/chat/completions failed after 1 attempts"):
        judge.propose(["x"], 2)
