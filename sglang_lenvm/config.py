"""Server-level LenVM settings and how they reach SGLang's processes.

SGLang's `ServerArgs` is sealed (strict argparse), so our flags are parsed by our launcher and
travel to every spawned SGLang process (scheduler, detokenizer) in one environment variable,
which child processes inherit. The plugin reads it back with `LenVMConfig.from_env()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

ENV_VAR = "SGLANG_LENVM_CONFIG"
DEFAULT_GAMMA = 0.997
DEFAULT_TOP_K = 15
# How `equal` measures "closest": ratio of (1 + length), or absolute tokens (the paper's rule).
EQUAL_DISTANCES = ("ratio", "tokens")
DEFAULT_EQUAL_DISTANCE = "ratio"
# `equal` outputs whose stop token never becomes a candidate (degenerate text keeps it out of
# the top-k) would run on to max_tokens. Once an output is this fraction past its target, the
# stop token joins the candidates, and with no budget left it is the closest. inf: never.
DEFAULT_EQUAL_MAX_OVERSHOOT = 0.25
# Only candidates with base probability >= this x the most likely candidate's compete on
# length (the most likely and stop tokens always do). 0: every top-k candidate.
# The three defaults below were picked on a measured frontier of length score against the
# base model's NLL (README, "Length and text quality"; benchmarks/decision_frontier.py).
DEFAULT_PLAUSIBILITY = 0.1
# equal samples q(x) ~ p(x) exp(-softness * d(x)), d the length distance; inf: the closest.
DEFAULT_EQUAL_SOFTNESS = 16.0
# at_least past its target: q(x) ~ p(x) (1 + l(x))^-pull, a pull toward ending; 0: none.
DEFAULT_AT_LEAST_END_PULL = 1.0
# at_most while budget is left: q(x) ~ p(x) exp(-softness * d+(x)), d+ how far x's predicted
# length runs past the budget (in ratio); inf: only candidates that fit (the hard rule).
# 2 from the frontier in benchmarks/results/decision_frontier_at_most.json (README).
DEFAULT_AT_MOST_SOFTNESS = 2.0
# at_most right after a sentence end: the stop token weighs this x its base probability (with
# sentence ends on); 1: its own. 10 from benchmarks/results/decision_frontier_at_most_samples.json
# (3 samples x 36 a row): NLL gap +0.16 +- 0.10 -> +0.10 +- 0.03, abrupt ends 54% -> 48%;
# 100 ended outputs earlier, where stopping cost more (65% abrupt).
DEFAULT_AT_MOST_END_BOOST = 10.0
# equal: a predicted length short of the budget counts this many times its distance (the length
# score falls 2.5 times as fast below the target as above it); 1: symmetric. 2.5 from the
# 3-sample rows of decision_frontier_equal_samples.json and ..._lifebench_equal_samples.json:
# LS 68.9 -> 78.8 (our set) and 68.4 -> 83.8 (LIFEBench lite), NLL gap +0.20 -> +0.16 and
# +0.25 -> +0.23 (README, "Where the text ends").
DEFAULT_EQUAL_UNDERSHOOT = 2.5
# Guided rows may not write a token n-gram of this many tokens more than DEFAULT_REPEAT_LIMIT
# times (runtime/repeat_guard.py: loops of a model kept writing); 0: no guard. 3 x 2 from the
# frontier rows with and without it (README, "The repetition guard"): repetitive outputs
# 42% -> 3% (equal, same day), 31% -> 11% (at_least), 6% -> 0% (at_most).
DEFAULT_REPEAT_NGRAM = 3
DEFAULT_REPEAT_LIMIT = 2
# equal and at_most: a token that ends a sentence counts as at most 1 token from the end, and an
# equal output may stop right after one (runtime/sentence_end.py); "off": the LenVM's lengths
# only. On: with it, equal outputs cut at the overshoot limit fell from 29 to 10 of 108 and the
# NLL gap from +0.22 to +0.20, at the same length score within noise (README, "Where the text
# ends"). An at_least output past its target may stop after one too: repetitive outputs 8 -> 2
# of 108 (README, "The repetition guard").
SENTENCE_ENDS = ("on", "off")
DEFAULT_SENTENCE_END = "on"
# Tokens one star forward may hold (roots + candidates): a step with more splits its rows into
# several forwards, so the scorer's workspace has a bound, charged to the KV budget at start.
DEFAULT_MAX_STAR_TOKENS = 4096
# Most samples (`n`, `best_of`) one request may ask for, on every route (the HTTP front door's
# guard, with or without a LenVM): SGLang expands n into n requests at once, so one body with
# n = 10**6 would occupy the server for hours. OpenAI's API has the same bound.
DEFAULT_MAX_N = 128
# How candidates are scored: "star" runs the LenVM over every candidate (a star tree: 1 + K
# tokens per request per step); "one-pass" runs it over the state only and scores the
# candidates with the checkpoint's candidate head (candidate_head.safetensors); "auto": one-pass
# when the checkpoint ships that head, else star.
SCORINGS = ("star", "one-pass", "auto")
DEFAULT_SCORING = "star"


def resolve_gamma(requested: Optional[float], recorded: Optional[float]) -> float:
    """The discount in use: the operator's --lenvm-gamma, else the checkpoint's `lenvm_gamma`
    (config.json), else DEFAULT_GAMMA."""
    if requested is not None:
        return requested
    return recorded if recorded is not None else DEFAULT_GAMMA


@dataclasses.dataclass(frozen=True)
class LenVMConfig:
    lenvm_path: str
    # None: take `lenvm_gamma` from the checkpoint's config.json, else DEFAULT_GAMMA.
    gamma: Optional[float] = None
    # Candidates per step for guided requests that set no top_k of their own.
    top_k: int = DEFAULT_TOP_K
    # Largest candidate set a request may ask for (bounds the scratch KV region).
    max_top_k: int = 64
    # equal: "ratio" compares ln(1 + l) with ln(1 + r); "tokens" compares l with r.
    equal_distance: str = DEFAULT_EQUAL_DISTANCE
    # equal: an output ends by (1 + this) x target tokens at the latest (stop token included).
    equal_max_overshoot: float = DEFAULT_EQUAL_MAX_OVERSHOOT
    # every mode: the plausibility floor alpha (see DEFAULT_PLAUSIBILITY)
    plausibility: float = DEFAULT_PLAUSIBILITY
    # equal: lambda of the soft rule (inf: deterministic closest candidate)
    equal_softness: float = DEFAULT_EQUAL_SOFTNESS
    # at_least: the pull toward ending once the target is reached (0: none)
    at_least_end_pull: float = DEFAULT_AT_LEAST_END_PULL
    # at_most: lambda of the soft rule (inf: only candidates predicted to fit)
    at_most_softness: float = DEFAULT_AT_MOST_SOFTNESS
    # at_most: the stop token's boost right after a sentence end (see DEFAULT_AT_MOST_END_BOOST)
    at_most_end_boost: float = DEFAULT_AT_MOST_END_BOOST
    # equal: the weight of undershoot in the length distance (see DEFAULT_EQUAL_UNDERSHOOT)
    equal_undershoot: float = DEFAULT_EQUAL_UNDERSHOOT
    # guided rows: no token n-gram of repeat_ngram tokens more than repeat_limit times (0: off)
    repeat_ngram: int = DEFAULT_REPEAT_NGRAM
    repeat_limit: int = DEFAULT_REPEAT_LIMIT
    # see SENTENCE_ENDS
    sentence_end: str = DEFAULT_SENTENCE_END
    # tokens per star forward (more: the step's rows are split into several forwards)
    max_star_tokens: int = DEFAULT_MAX_STAR_TOKENS
    # see SCORINGS
    scoring: str = DEFAULT_SCORING
    # One-pass scoring only: the LenVM's leading decoder layers that are the base model's own,
    # bit for bit (checkpoint.shared_trunk_layers, found at launch); the LenVM then starts from
    # the base model's residual stream there. 0: none (or --lenvm-shared-trunk off).
    trunk_layers: int = 0

    def __post_init__(self):
        if self.gamma is not None and not (0.0 < self.gamma < 1.0 and math.isfinite(self.gamma)):
            raise ValueError(f"--lenvm-gamma must be in (0, 1), got {self.gamma}")
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"--lenvm-top-k must be in [1, {self.max_top_k}], got {self.top_k}")
        if self.equal_distance not in EQUAL_DISTANCES:
            raise ValueError(f"--lenvm-equal-distance must be one of {EQUAL_DISTANCES}, "
                             f"got {self.equal_distance!r}")
        if not self.equal_max_overshoot >= 0.0:  # also rejects NaN
            raise ValueError(f"--lenvm-equal-max-overshoot must be >= 0 (inf: never stop), "
                             f"got {self.equal_max_overshoot}")
        if not 0.0 <= self.plausibility <= 1.0:
            raise ValueError(f"--lenvm-plausibility must be in [0, 1], got {self.plausibility}")
        if not (0.0 <= self.at_least_end_pull < math.inf):
            raise ValueError(f"--lenvm-at-least-end-pull must be a finite number >= 0, "
                             f"got {self.at_least_end_pull}")
        if self.trunk_layers < 0:
            raise ValueError(f"trunk_layers must be >= 0, got {self.trunk_layers}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"--lenvm-scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not self.equal_softness >= 0.0:
            raise ValueError(f"--lenvm-equal-softness must be >= 0 (inf: the closest candidate), "
                             f"got {self.equal_softness}")
        if self.max_star_tokens < self.max_top_k + 2:
            raise ValueError(f"--lenvm-max-star-tokens must hold one request's largest tree "
                             f"(root + {self.max_top_k} candidates + a stop slot = "
                             f"{self.max_top_k + 2}), got {self.max_star_tokens}")
        from sglang_lenvm.runtime.repeat_guard import WINDOW
        if not 0 <= self.repeat_ngram <= WINDOW:
            raise ValueError(f"--lenvm-repeat-ngram must be in [0, {WINDOW}] (0: no guard), "
                             f"got {self.repeat_ngram}")
        if self.repeat_limit < 1:
            raise ValueError(f"--lenvm-repeat-limit must be >= 1, got {self.repeat_limit}")
        if self.sentence_end not in SENTENCE_ENDS:
            raise ValueError(f"--lenvm-sentence-end must be one of {SENTENCE_ENDS}, "
                             f"got {self.sentence_end!r}")
        if not self.at_most_softness >= 0.0:
            raise ValueError(f"--lenvm-at-most-softness must be >= 0 (inf: only candidates "
                             f"that fit), got {self.at_most_softness}")
        if not 0.1 <= self.equal_undershoot <= 10.0:
            raise ValueError(f"--lenvm-equal-undershoot must be in [0.1, 10], "
                             f"got {self.equal_undershoot}")
        if not 1.0 <= self.at_most_end_boost <= 1e6:
            raise ValueError(f"--lenvm-at-most-end-boost must be in [1, 1e6], "
                             f"got {self.at_most_end_boost}")

    def decision_rule(self) -> dict:
        """The decision rule's knobs, as keyword arguments of decision.decide (and the fused
        kernel): one place that says which settings the rule reads."""
        return dict(equal_distance=self.equal_distance, plausibility=self.plausibility,
                    equal_softness=self.equal_softness, at_least_end_pull=self.at_least_end_pull,
                    at_most_softness=self.at_most_softness,
                    at_most_end_boost=self.at_most_end_boost,
                    equal_undershoot=self.equal_undershoot)

    def resolved_scoring(self, has_candidate_head: bool) -> str:
        """"star" or "one-pass" for a checkpoint with or without a candidate head."""
        if self.scoring == "one-pass" and not has_candidate_head:
            raise ValueError(f"--lenvm-scoring one-pass needs candidate_head.safetensors in "
                             f"{self.lenvm_path} (python -m sglang_lenvm.train "
                             f"--candidate-head trains one)")
        if self.scoring == "auto":
            return "one-pass" if has_candidate_head else "star"
        return self.scoring

    def to_env(self) -> None:
        os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(self))  # Infinity round-trips

    @classmethod
    def from_env(cls) -> Optional["LenVMConfig"]:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        return cls(**json.loads(raw))
