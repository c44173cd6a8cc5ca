"""``Judge`` on a local transformers causal LM: the live policy or any local Hugging Face directory.

:class:`HFJudge` builds, for each step, the judging prompt of :func:`stages.reward.judge_prompts.step_prompt`
(problem, previous steps, the step, "Is this step correct?") and compares the model's
log-probability of a "yes"-like continuation with that of a "no"-like one (CAPO, survey §3.3.1)::

    score = logsumexp_{y in yes_words} log p(y | prompt) - logsumexp_{n in no_words} log p(n | prompt)
    verdict = 1.0 if score > margin else 0.0

All steps of a batch are scored together through the project's one scorer
(:class:`stages.rollout.scorer.HFScorer`, one forward per chunk of ``batch_size`` sequences; when
every yes/no word is a single token the prompts alone are run once and the candidate tokens'
next-token log-probs gathered). ``propose`` (InT's corrections, §3.3.3) generates free text
(greedy by default) with :class:`stages.rollout.hf_engine.HFEngine`, stopping at the end of a line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from stages.reward.judge_prompts import batch_step_queries
from stages.rollout.policy import pad_token_id
from stages.rollout.scorer import HFScorer
from stages.schema import Batch

DEFAULT_YES = (" yes", " Yes")
DEFAULT_NO = (" no", " No")


class HFJudge:
    """``Judge`` on a local transformers causal LM (the live policy or a local HF directory).

    ``yes_words`` / ``no_words``: continuations of the prompt's ``"Answer:"`` whose summed
    probabilities are compared; ``margin``: the log-odds threshold (``score > margin`` = correct);
    ``propose_temperature``: 0 = greedy proposals.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        yes_words: Sequence[str] = DEFAULT_YES,
        no_words: Sequence[str] = DEFAULT_NO,
        margin: float = 0.0,
        batch_size: int = 32,
        propose_temperature: float = 0.0,
        seed: int = 0,
        name: str = "policy",
    ):
        if tokenizer is None:
            raise ValueError("HFJudge needs the model's tokenizer")
        if not math.isfinite(margin):
            raise ValueError(f"judge margin must be a finite number, got {margin!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.margin = float(margin)
        self.propose_temperature = float(propose_temperature)
        self.seed = int(seed)
        self.scorer = HFScorer(model, pad_token_id=pad_token_id(tokenizer, model), batch_size=batch_size)
        self.yes_ids = [self._encode(w, "yes_words") for w in yes_words]
        self.no_ids = [self._encode(w, "no_words") for w in no_words]
        if not self.yes_ids or not self.no_ids:
            raise ValueError("HFJudge needs at least one yes word and one no word")
        if {tuple(x) for x in self.yes_ids} & {tuple(x) for x in self.no_ids}:
            raise ValueError(f"yes_words {list(yes_words)} and no_words {list(no_words)} share a tokenization")
        self.calls = 0
        self.completion_tokens = 0
        self._gen_forwards = 0
        #: log-odds scores of the last step_verdicts call ((B, K), nan where absent)
        self.last_scores: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"HFJudge(name={self.name!r}, model={type(self.model).__name__}, margin={self.margin})"

    def _encode(self, text: str, what: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"judge {what}: {text!r} encodes to no tokens")
        return list(ids)

    @property
    def forward_passes(self) -> int:
        return self.scorer.forward_passes + self._gen_forwards

    @property
    def prompt_tokens(self) -> int:
        return self.scorer.prompt_tokens

    def score_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(N,) log-odds ``log P(yes-like) - log P(no-like)`` of the next words after each prompt."""
        if not prompts:
            return torch.zeros(0)
        ctx = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        cands = self.yes_ids + self.no_ids
        if all(len(c) == 1 for c in cands):
            # fast path: one forward per chunk of prompts, the candidates' next-token log-probs gathered
            lps = self.scorer.next_token_logprobs(ctx, [c[0] for c in cands])
        else:  # multi-token words: score every (prompt, word) pair in the same batched forwards
            flat_c = [c for c in ctx for _ in cands]
            flat_t = [t for _ in ctx for t in cands]
            lps = torch.stack([x.sum() for x in self.scorer(flat_c, flat_t)]).view(len(ctx), len(cands))
        ny = len(self.yes_ids)
        return torch.logsumexp(lps[:, :ny], -1) - torch.logsumexp(lps[:, ny:], -1)

    def prompt_scores(self, prompts: list[str]) -> torch.Tensor:
        """(N,) ``P(yes-like)`` in (0, 1) after each free-form yes/no prompt (ending in ``"Answer:"``):
        ``sigmoid(log-odds - margin)``, the yes/no probability renormalised over the two word sets,
        shifted by the margin (turn-level judges: TARL, CriticSearch, LaRe; survey §5.1, §5.2, §5.7)."""
        s = self.score_prompts(list(prompts))
        self.calls += len(prompts)
        return torch.sigmoid(s.float() - self.margin)

    def step_verdicts(self, batch: Batch) -> torch.Tensor:
        positions, prompts, K = batch_step_queries(batch)
        verdicts = torch.full((len(batch.trajectories), K), float("nan"))
        scores = torch.full_like(verdicts, float("nan"))
        if positions:
            s = self.score_prompts(prompts)
            rows = torch.tensor([p[0] for p in positions])
            cols = torch.tensor([p[1] for p in positions])
            scores[rows, cols] = s
            verdicts[rows, cols] = (s > self.margin).float()
        self.calls += len(positions)
        self.last_scores = scores
        return verdicts

    def propose(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from stages.rollout.engine import GenerationRequest
        from stages.rollout.hf_engine import HFEngine
        from stages.rollout.agent_loop import stop_token_ids

        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        engine = HFEngine(self.model, pad_token_id=self.scorer.pad_token_id)
        ctx = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        reqs = [GenerationRequest(context_ids=list(c), seed=self.seed + i) for i, c in enumerate(ctx)]
        outs = engine.generate(reqs, max_new_tokens, stop_token_ids(self.tokenizer),
                               temperature=self.propose_temperature)
        self.calls += len(prompts)
        self._gen_forwards += int(engine.stats["forward_passes"])
        self.scorer.prompt_tokens += sum(len(c) for c in ctx)
        self.completion_tokens += int(engine.stats["generated_tokens"])
        texts = self.tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
        return [t.strip() for t in texts]
