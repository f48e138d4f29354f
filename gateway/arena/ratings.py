"""Arena ratings: votes in, leaderboard out, the way LMSYS's Chatbot Arena computes it.

This module owns the arithmetic only (numpy, no Redis, no I/O), so it can be
tested exactly and the gateway can keep the running state wherever it likes:

- `Tally` accumulates votes incrementally: outcome counts per ordered pair (all
  Bradley–Terry and the bootstrap need, so votes are never re-read), online Elo
  in arrival order, and votes per model. It flattens to string fields for one
  Redis hash.
- `bradley_terry` fits the maximum-likelihood ratings the leaderboard ranks by
  (order-independent, unlike online Elo), `bootstrap` their 95% intervals,
  `win_fractions` the head-to-head matrix and `leaderboard` the ranked rows.

Ratings use the Elo scale: a 400-point gap means 10:1 odds. A tie, and a
"both_bad" vote, counts as half a win for each side, as FastChat does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

K = 4.0
SCALE = 400.0
BASE = 10.0
INIT_RATING = 1000.0
WINNERS = ("a", "b", "tie", "both_bad")

# Natural-log units of strength per rating point: P(i beats j) = sigmoid((R_i - R_j) * _NAT).
_NAT = math.log(BASE) / SCALE
# The L2 prior on strengths (natural units): a Gaussian with sd ~32 (about 5,500 rating points). It keeps a
# model that never lost (or never won) finite, makes the optimum unique and pins the mean strength to 0, and
# moves a model with tens of battles by hundredths of a point.
_PRIOR = 1e-3
_TOL = 1e-9
_MAX_ITER = 100

Floats = NDArray[np.float64]


@dataclass
class Tally:
    """The running state of an arena: aggregated outcomes, online Elo and votes per model.

    `pairs[(a, b)]` is (wins_a, wins_b, ties) for battles that showed `a` on the
    left; "both_bad" votes count as ties. `to_fields` flattens the state to one
    Redis hash with readable values:

    - ``elo:<model>`` -> ``repr(float)`` (exact, so a restored tally continues bit for bit)
    - ``votes:<model>`` -> ``"17"``
    - ``pair:<a>\\t<b>`` -> ``"wins_a wins_b ties"``

    The two names of a pair are joined by a tab, so model names may hold ':' and
    '/' but not a tab; `add` refuses one.
    """

    pairs: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    elo: dict[str, float] = field(default_factory=dict)
    votes: dict[str, int] = field(default_factory=dict)

    def add(self, model_a: str, model_b: str, winner: str) -> None:
        """Count one vote; winner is "a", "b", "tie" or "both_bad"."""
        _check_vote(model_a, model_b, winner)
        wins_a, wins_b, ties = self.pairs.get((model_a, model_b), (0, 0, 0))
        self.pairs[(model_a, model_b)] = (wins_a + (winner == "a"), wins_b + (winner == "b"),
                                          ties + (winner in ("tie", "both_bad")))
        for model in (model_a, model_b):
            self.votes[model] = self.votes.get(model, 0) + 1
        self._update_elo(model_a, model_b, {"a": 1.0, "b": 0.0}.get(winner, 0.5))

    def _update_elo(self, model_a: str, model_b: str, score_a: float) -> None:
        rating_a = self.elo.get(model_a, INIT_RATING)
        rating_b = self.elo.get(model_b, INIT_RATING)
        expected_a = 1 / (1 + BASE ** ((rating_b - rating_a) / SCALE))
        expected_b = 1 / (1 + BASE ** ((rating_a - rating_b) / SCALE))
        self.elo[model_a] = rating_a + K * (score_a - expected_a)
        self.elo[model_b] = rating_b + K * (1 - score_a - expected_b)

    @property
    def models(self) -> list[str]:
        """Every model that has a vote, sorted by name."""
        return sorted(self.votes)

    def to_fields(self) -> dict[str, str]:
        """The whole state as string fields for one Redis hash (see the class docstring)."""
        fields = {f"elo:{model}": repr(rating) for model, rating in self.elo.items()}
        fields.update({f"votes:{model}": str(count) for model, count in self.votes.items()})
        fields.update({f"pair:{a}\t{b}": " ".join(map(str, counts)) for (a, b), counts in self.pairs.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Tally:
        """Rebuild a tally from `to_fields`' output; fields of other kinds are ignored, for newer writers."""
        tally = cls()
        for key, value in fields.items():
            kind, _, name = key.partition(":")
            if kind == "elo":
                tally.elo[name] = float(value)
            elif kind == "votes":
                tally.votes[name] = int(value)
            elif kind == "pair":
                model_a, model_b = name.split("\t")
                wins_a, wins_b, ties = (int(part) for part in value.split())
                tally.pairs[(model_a, model_b)] = (wins_a, wins_b, ties)
        return tally


def _check_vote(model_a: str, model_b: str, winner: str) -> None:
    if winner not in WINNERS:
        raise ValueError(f"winner must be one of {', '.join(WINNERS)}, not {winner!r}")
    if model_a == model_b:
        raise ValueError(f"a battle needs two different models, got {model_a!r} twice")
    for model in (model_a, model_b):
        if not model or "\t" in model:
            raise ValueError(f"a model name must be non-empty and hold no tab: {model!r}")


@dataclass(frozen=True)
class _Cells:
    """Outcomes per unordered pair i < j: columns i won, j won, tied. Position does not enter BT."""

    models: list[str]
    first: NDArray[np.intp]
    second: NDArray[np.intp]
    counts: Floats


def _cells(tally: Tally, models: list[str] | None) -> _Cells:
    names = tally.models if models is None else list(models)
    index = {model: i for i, model in enumerate(names)}
    merged: dict[tuple[int, int], list[float]] = {}
    for (model_a, model_b), (wins_a, wins_b, ties) in tally.pairs.items():
        if model_a not in index or model_b not in index:
            continue
        i, j = index[model_a], index[model_b]
        first_won, second_won = (wins_a, wins_b) if i < j else (wins_b, wins_a)
        cell = merged.setdefault((min(i, j), max(i, j)), [0.0, 0.0, 0.0])
        cell[0] += first_won
        cell[1] += second_won
        cell[2] += ties
    keys = list(merged)
    return _Cells(names, np.array([k[0] for k in keys], dtype=np.intp), np.array([k[1] for k in keys], dtype=np.intp),
                  np.array([merged[k] for k in keys], dtype=np.float64).reshape(-1, 3))


def _wins(cells: _Cells, counts: Floats) -> Floats:
    """wins[i, j]: how often i beat j, each tie half a win each way."""
    size = len(cells.models)
    wins = np.zeros((size, size))
    half_ties = 0.5 * counts[:, 2]
    wins[cells.first, cells.second] = counts[:, 0] + half_ties
    wins[cells.second, cells.first] = counts[:, 1] + half_ties
    return wins


def _log_sigmoid(x: Floats) -> Floats:
    return -np.logaddexp(0.0, -x)


def _objective(wins: Floats, theta: Floats) -> float:
    """Log-likelihood of the BT model plus the L2 prior."""
    diff = theta[:, None] - theta[None, :]
    return float(np.sum(wins * _log_sigmoid(diff)) - 0.5 * _PRIOR * theta @ theta)


def _fit(wins: Floats, theta: Floats | None = None) -> Floats:
    """Maximise `_objective` by Newton's method with a backtracking line search.

    The objective is strictly concave (the prior sees to that), so Newton
    converges to the unique optimum, quadratically near it; the line search
    keeps the early steps from overshooting.
    """
    games = wins + wins.T
    theta = np.zeros(len(wins)) if theta is None else theta.copy()
    value = _objective(wins, theta)
    for _ in range(_MAX_ITER):
        prob = np.exp(_log_sigmoid(theta[:, None] - theta[None, :]))
        grad = wins.sum(axis=1) - (games * prob).sum(axis=1) - _PRIOR * theta
        weight = games * prob * (1 - prob)
        step = np.linalg.solve(np.diag(weight.sum(axis=1) + _PRIOR) - weight, grad)
        theta, value, moved = _line_search(wins, theta, value, step, float(grad @ step))
        if moved < _TOL:
            break
    return theta


def _line_search(wins: Floats, theta: Floats, value: float, step: Floats, slope: float) -> tuple[Floats, float, float]:
    """Halve the step until it gains what the slope promises (Armijo); return the point, its value, the move."""
    size = 1.0
    while size > 1e-12:
        candidate = theta + size * step
        new_value = _objective(wins, candidate)
        if new_value >= value + 1e-4 * size * slope:
            return candidate, new_value, float(np.max(np.abs(size * step), initial=0.0))
        size /= 2
    return theta, value, 0.0


def _to_ratings(theta: Floats) -> Floats:
    return INIT_RATING + theta / _NAT


def bradley_terry(tally: Tally, models: list[str] | None = None) -> dict[str, float]:
    """Maximum-likelihood Bradley–Terry ratings: what the leaderboard ranks by.

    Unlike online Elo they do not depend on the order of the votes. Ties count
    as half a win each way. Ratings are on the Elo scale with the mean of the
    fitted models at exactly 1000 (the prior's optimum sits at mean strength 0;
    each disconnected group of models is centred on its own). `models` restricts
    the fit to the votes among those models (default: every model with a vote);
    a model with no battles among them rates 1000.
    """
    cells = _cells(tally, models)
    ratings = _to_ratings(_fit(_wins(cells, cells.counts)))
    return dict(zip(cells.models, ratings.tolist()))


def bootstrap(tally: Tally, rounds: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% intervals (2.5th and 97.5th percentiles) of each model's BT rating, by resampling the votes.

    Drawing the vote count multinomially over the (pair, outcome) cells is the
    same as resampling votes with replacement, without the votes. Each round
    refits, starting from the full fit, which saves most of the iterations.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    cells = _cells(tally, None)
    if not cells.models:
        return {}
    total = cells.counts.sum()
    start = _fit(_wins(cells, cells.counts))
    draws = np.random.default_rng(seed).multinomial(int(total), cells.counts.ravel() / total, size=rounds)
    samples = np.array([_fit(_wins(cells, draw.reshape(-1, 3).astype(np.float64)), start) for draw in draws])
    low, high = np.percentile(_to_ratings(samples), [2.5, 97.5], axis=0)
    return {model: (float(lo), float(hi)) for model, lo, hi in zip(cells.models, low, high)}


def win_fractions(tally: Tally, models: list[str] | None = None) -> tuple[list[str], list[list[float | None]]]:
    """matrix[i][j]: the fraction of the non-tied battles between i and j that i won; None where there were none.

    JSON-ready for the UI's win-fraction matrix. Rows and columns follow
    `models`, by default ordered by BT rating, best first, like the leaderboard.
    """
    if models is None:
        ratings = bradley_terry(tally)
        models = sorted(ratings, key=lambda model: (-ratings[model], model))
    cells = _cells(tally, models)
    decisive = cells.counts.copy()
    decisive[:, 2] = 0.0
    wins = _wins(cells, decisive)
    games = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = wins / games
    matrix = [[None if games[i, j] == 0 else float(fractions[i, j]) for j in range(len(models))]
              for i in range(len(models))]
    return list(models), matrix


@dataclass(frozen=True)
class Row:
    """One leaderboard line. rank: 1 + the models whose interval lies wholly above this one's (LMSYS's rule)."""

    rank: int
    model: str
    rating: float
    ci_low: float
    ci_high: float
    elo: float
    votes: int
    win_rate: float


def _scores(tally: Tally) -> dict[str, float]:
    """Wins plus half the ties of each model: the numerator of its win rate."""
    scores = dict.fromkeys(tally.votes, 0.0)
    for (model_a, model_b), (wins_a, wins_b, ties) in tally.pairs.items():
        scores[model_a] = scores.get(model_a, 0.0) + wins_a + 0.5 * ties
        scores[model_b] = scores.get(model_b, 0.0) + wins_b + 0.5 * ties
    return scores


def leaderboard(tally: Tally, rounds: int = 200, seed: int = 0) -> list[Row]:
    """Every model with a vote, best BT rating first, with its interval, online Elo, votes and win rate."""
    ratings = bradley_terry(tally)
    intervals = bootstrap(tally, rounds, seed)
    scores = _scores(tally)
    order = sorted(ratings, key=lambda model: (-ratings[model], model))
    return [
        Row(rank=1 + sum(intervals[other][0] > intervals[model][1] for other in order), model=model,
            rating=ratings[model], ci_low=intervals[model][0], ci_high=intervals[model][1],
            elo=tally.elo.get(model, INIT_RATING), votes=tally.votes[model],
            win_rate=scores[model] / tally.votes[model])
        for model in order
    ]
