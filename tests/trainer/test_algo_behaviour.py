"""IQL and CQL do what their papers say, on offline data whose answer is known.

The data are one-step episodes of a contextual bandit: the best action depends on the
sign of the first observation feature, and the behaviour policy that logged the data
mostly takes a worse one. Imitating the data therefore picks the wrong action, and

- IQL's greedy action must be the best one (a flipped advantage sign, or a target critic
  that never moves, teaches it the behaviour's or a worse action);
- with an extreme advantage IQL's AWR weights must stay clipped (unclipped, exp(beta *
  adv) overflows and the actor's weights become NaN);
- the target critics must follow the online critics (Polyak averaging);
- CQL's Q of actions the data never took must sit below the Q of the ones it took (a
  flipped penalty sign lifts them instead);
- CQL's sampled penalty must estimate ``log integral exp Q(s, a) da``, which grows by
  ``log 2`` per action dimension of the unit box (the density correction of the sampled
  actions provides that term).

Everything goes through public interfaces: config dicts, ``AlgoContext``, ``update``,
``act``, ``evaluate`` (its ``q_mean`` is the mean Q over a batch's (s, a) pairs, so a batch
holding chosen actions reads Q there) and ``state_dict``. Episodes end after one step,
so the discount plays no part.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipeline.store import ActionSpace
from trainer.algos import AlgoContext, make_algorithm
from trainer.algos.base import AlgorithmBase
from trainer.batch import TransitionBatch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS_DIM, N_ACTIONS, ACT_DIM = 3, 4, 2
# Not [-1, 1]: the algorithms work in a unit action space and must map both ways.
LOW, HIGH = np.array([-2.0, -1.0]), np.array([2.0, 1.0])
DATASET, BATCH = 2048, 128
# float32 hidden layers everywhere ("auto" picks bfloat16 on some CPUs): the same numbers
# on every machine.
NETS = {"hidden": (32, 32), "critic_hidden": (32, 32), "compute_dtype": "float32"}
IQL_FAST = {**NETS, "actor_lr": 3e-3, "critic_lr": 3e-3, "value_lr": 3e-3, "tau": 0.05}
IQL_CONFIG = {**IQL_FAST, "beta": 10.0, "expectile": 0.8}
CQL_CONFIG = {
    **NETS,
    "penalty_dtype": "float32",
    "critic_lr": 3e-3,
    "tau": 0.05,
    "n_action_samples": 4,
}
KINDS = pytest.mark.parametrize("discrete", [True, False], ids=["discrete", "continuous"])


# ----------------------------------------------------------------------------- problem
def make_ctx(discrete: bool, act_dim: int = ACT_DIM) -> AlgoContext:
    if discrete:
        space = ActionSpace("discrete", N_ACTIONS, None, None, None)
    else:
        low, high = np.resize(LOW, act_dim), np.resize(HIGH, act_dim)
        space = ActionSpace("continuous", None, act_dim, low, high)
    return AlgoContext(
        obs_dim=OBS_DIM,
        action_space=space,
        obs_mean=np.zeros(OBS_DIM, np.float32),
        obs_std=np.ones(OBS_DIM, np.float32),
        discount=0.9,
        device=torch.device("cpu"),
    )


def to_env(unit: np.ndarray) -> np.ndarray:
    """Unit-box actions in [-1, 1]^A -> env units in [LOW, HIGH]."""
    return (LOW + HIGH) / 2 + unit * (HIGH - LOW) / 2


def to_unit(action: np.ndarray) -> np.ndarray:
    return (action - (LOW + HIGH) / 2) / ((HIGH - LOW) / 2)


class Bandit:
    """A contextual bandit; ``side(s) = sign(s_0)`` decides which action is best.

    Discrete (4 actions): the best action is 2 when ``s_0 > 0`` else 3, reward 1; action
    1 pays 0.5 everywhere, the rest 0. The behaviour policy takes action 1 60% of the
    time, the best action 25%, and a uniform one otherwise (actions in ``never`` are
    replaced by action 1: the data never holds them).

    Continuous (2-d, in unit-box coordinates): the best action is ``(0.6 side, 0.5)``,
    reward ``1 - |u - best|^2 / 2``; the behaviour policy takes ``(-0.6 side, -0.5)``
    (reward -0.22) 70% of the time and the best action 30%, each with N(0, 0.1) noise.
    """

    def __init__(self, discrete: bool, never: tuple[int, ...] = ()) -> None:
        self.discrete = discrete
        self.never = never

    @staticmethod
    def side(obs: np.ndarray) -> np.ndarray:
        return np.where(obs[:, 0] > 0, 1.0, -1.0)

    def best(self, obs: np.ndarray) -> np.ndarray:
        """Best actions: (B,) int64 discrete, (B, 2) unit-box coordinates continuous."""
        if self.discrete:
            return np.where(obs[:, 0] > 0, 2, 3)
        return np.stack([0.6 * self.side(obs), np.full(len(obs), 0.5)], axis=1)

    def worse(self, obs: np.ndarray) -> np.ndarray:
        """The behaviour policy's favourite, a sub-optimal action."""
        if self.discrete:
            return np.ones(len(obs), np.int64)
        return -self.best(obs)

    def reward(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        if self.discrete:
            best = self.best(obs)
            return np.where(actions == best, 1.0, np.where(actions == 1, 0.5, 0.0))
        return 1.0 - np.square(to_unit(actions) - self.best(obs)).sum(-1) / 2

    def dataset(self, size: int = DATASET, seed: int = 0) -> TransitionBatch:
        rng = np.random.default_rng(seed)
        obs = rng.normal(size=(size, OBS_DIM)).astype(np.float32)
        u = rng.random(size)
        actions: np.ndarray
        if self.discrete:
            uniform = rng.integers(0, N_ACTIONS, size)
            actions = np.where(u < 0.6, 1, np.where(u < 0.85, self.best(obs), uniform))
            actions = np.where(np.isin(actions, self.never), 1, actions)
        else:
            unit = np.where((u < 0.7)[:, None], self.worse(obs), self.best(obs))
            unit = np.clip(unit + 0.1 * rng.normal(size=unit.shape), -0.99, 0.99)
            actions = to_env(unit)
        rewards = self.reward(obs, actions)
        return transitions(obs, actions, rewards)


def transitions(obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> TransitionBatch:
    """One-step episodes: every transition terminates."""
    n = len(obs)
    obs_t = torch.as_tensor(obs, dtype=torch.float32)
    actions_t = (
        torch.as_tensor(actions, dtype=torch.int64)
        if actions.ndim == 1
        else torch.as_tensor(actions, dtype=torch.float32)
    )
    rewards_t = torch.as_tensor(rewards, dtype=torch.float32)
    return TransitionBatch(
        observations=obs_t,
        actions=actions_t,
        rewards=rewards_t,
        next_observations=obs_t.clone(),
        terminated=torch.ones(n),
        truncated=torch.zeros(n),
        return_to_go=rewards_t,
    )


def minibatches(data: TransitionBatch, steps: int, seed: int) -> list[TransitionBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, data.batch_size, BATCH))
        out.append(
            TransitionBatch(
                observations=data.observations[idx],
                actions=data.actions[idx],
                rewards=data.rewards[idx],
                next_observations=data.next_observations[idx],
                terminated=data.terminated[idx],
                truncated=data.truncated[idx],
                return_to_go=data.return_to_go[idx],
            )
        )
    return out


def build(name: str, discrete: bool, config: dict[str, Any], seed: int = 0) -> AlgorithmBase:
    torch.manual_seed(seed)
    algo = make_algorithm(name, make_ctx(discrete), config)
    assert isinstance(algo, AlgorithmBase)
    return algo


def train(
    name: str,
    discrete: bool,
    config: dict[str, Any],
    data: TransitionBatch,
    steps: int,
    seed: int = 0,
) -> AlgorithmBase:
    algo = build(name, discrete, config, seed)
    for batch in minibatches(data, steps, seed):
        algo.update(batch)
    return algo


def held_out_states(n: int = 400) -> np.ndarray:
    return np.random.default_rng(99).normal(size=(n, OBS_DIM)).astype(np.float32)


def mean_q(algo: AlgorithmBase, obs: np.ndarray, actions: np.ndarray) -> float:
    """Mean over the ensemble and the pairs of Q(obs[i], actions[i])."""
    rewards = np.zeros(len(obs), np.float32)
    return algo.evaluate(transitions(obs, actions, rewards))["q_mean"]


def fraction_best(problem: Bandit, algo: AlgorithmBase, obs: np.ndarray) -> float:
    """Share of states where the greedy action is (near) the best one."""
    acts = algo.act(obs)
    assert np.all(np.isfinite(acts)), "the policy's actions are not finite"
    if problem.discrete:
        return float(np.mean(acts == problem.best(obs)))
    unit = to_unit(acts)
    to_best = np.linalg.norm(unit - problem.best(obs), axis=1)
    to_worse = np.linalg.norm(unit - problem.worse(obs), axis=1)
    return float(np.mean((to_best < 0.3) & (to_best < to_worse)))


@KINDS
def test_the_data_mostly_takes_a_worse_action(discrete: bool) -> None:
    """The premise of the IQL tests: imitating the data is wrong."""
    problem = Bandit(discrete)
    data = problem.dataset()
    obs = data.observations.numpy()
    if discrete:
        best_share = float(np.mean(data.actions.numpy() == problem.best(obs)))
    else:
        unit = to_unit(data.actions.numpy())
        best_share = float(np.mean(np.linalg.norm(unit - problem.best(obs), axis=1) < 0.5))
    assert 0.2 < best_share < 0.4


# ----------------------------------------------------------------------------- IQL
def iql_steps(discrete: bool) -> int:
    """Updates after which IQL's greedy action is the best one in over 90% of states."""
    return 200 if discrete else 400


@KINDS
def test_iql_greedy_action_is_the_best_one(discrete: bool) -> None:
    problem = Bandit(discrete)
    algo = train("iql", discrete, IQL_CONFIG, problem.dataset(), iql_steps(discrete))
    obs = held_out_states()
    share = fraction_best(problem, algo, obs)
    assert share > 0.8, f"the greedy action is the best one in only {share:.0%} of states"
    # Q ranks the best action above the behaviour's favourite by most of the reward gap
    best, worse = problem.best(obs), problem.worse(obs)
    if not discrete:
        best, worse = to_env(best), to_env(worse)
    reward_gap = float(np.mean(problem.reward(obs, best) - problem.reward(obs, worse)))
    q_gap = mean_q(algo, obs, best) - mean_q(algo, obs, worse)
    assert q_gap > 0.6 * reward_gap, (q_gap, reward_gap)


@KINDS
def test_iql_awr_weights_stay_clipped_under_an_extreme_advantage(discrete: bool) -> None:
    """beta = 1e4 makes exp(beta * adv) overflow float32 for any advantage above ~0.01:
    clipped at max_weight, IQL becomes a filtered BC of the better-than-V actions."""
    problem = Bandit(discrete)
    config = {**IQL_CONFIG, "beta": 1e4, "max_weight": 5.0}
    algo = train("iql", discrete, config, problem.dataset(), iql_steps(discrete))
    obs = held_out_states()
    metrics = algo.evaluate(problem.dataset(256, seed=1))
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    share = fraction_best(problem, algo, obs)
    assert share > 0.8, f"the greedy action is the best one in only {share:.0%} of states"


# ----------------------------------------------------------------------------- targets
def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts of one network."""
    assert a.keys() == b.keys()
    return float(sum((a[k] - b[k]).square().sum() for k in a) ** 0.5)


def critics(algo: AlgorithmBase) -> tuple[dict, dict]:
    """The online and the target critics' weights, as a checkpoint holds them."""
    modules = algo.state_dict()["modules"]
    return modules["critic"], modules["target_critic"]


@pytest.mark.parametrize("name", ["iql", "cql"])
@KINDS
def test_target_critic_follows_the_online_critic(name: str, discrete: bool) -> None:
    problem = Bandit(discrete)
    config = IQL_FAST if name == "iql" else CQL_CONFIG
    data = problem.dataset(512)
    # tau = 1: the target critic is a copy of the online one after every update
    online, target = critics(train(name, discrete, {**config, "tau": 1.0}, data, steps=3))
    assert distance(online, target) < 1e-6
    # tau = 0.1: it moves from where it started toward the online critic, and lags it
    _, start = critics(build(name, discrete, {**config, "tau": 0.1}))
    online, target = critics(train(name, discrete, {**config, "tau": 0.1}, data, steps=20))
    assert 0.0 < distance(online, target) < 0.8 * distance(online, start)


# ----------------------------------------------------------------------------- CQL
def test_discrete_cql_ranks_unseen_actions_below_the_taken_ones() -> None:
    problem = Bandit(True, never=(0,))
    data = problem.dataset()
    assert not bool((data.actions == 0).any())
    # a light penalty (the default is 1): strong enough to sink what the data never took,
    # weak enough that the rarer best action keeps its lead over the frequent one
    algo = train("cql", True, {**CQL_CONFIG, "cql_alpha": 0.1}, data, steps=300)
    obs = held_out_states()
    unseen = mean_q(algo, obs, np.zeros(len(obs), np.int64))
    taken = [mean_q(algo, obs, np.full(len(obs), a)) for a in (1, 2, 3)]
    assert unseen < min(taken) - 1.0, (unseen, taken)
    share = fraction_best(problem, algo, obs)
    assert share > 0.8, f"the greedy action is the best one in only {share:.0%} of states"


def test_continuous_cql_ranks_unseen_actions_below_the_taken_ones() -> None:
    """The data's actions lie near (0.6 side, 0.5) and (-0.6 side, -0.5); none lies near
    the corners (0.9 side, -0.9) or (-0.9 side, 0.9). Without the penalty the critic
    extrapolates to the second corner above the worse taken action; with it both corners
    sink below everything the data took."""
    problem = Bandit(False)
    algo = train("cql", False, CQL_CONFIG, problem.dataset(), steps=200)
    obs = held_out_states()
    side, one = problem.side(obs), np.ones(len(obs))
    taken = [mean_q(algo, obs, to_env(problem.best(obs)))]
    taken.append(mean_q(algo, obs, to_env(problem.worse(obs))))
    corners = [np.stack([0.9 * side, -0.9 * one], 1), np.stack([-0.9 * side, 0.9 * one], 1)]
    unseen = [mean_q(algo, obs, to_env(corner)) for corner in corners]
    assert max(unseen) < min(taken) - 1.0, (unseen, taken)


def test_cql_penalty_grows_by_log_2_per_action_dimension() -> None:
    """``log integral exp Q(s, a) da`` over [-1, 1]^A is ``A log 2 + log mean exp Q``.

    A freshly initialised critic is nearly flat in the action, so the first update's gap
    of an 8-d action space exceeds that of a 1-d one by about ``7 log 2``. Without the
    density correction of the sampled actions the gap is ``log M`` plus the spread of Q,
    whatever A is.
    """
    gaps = {}
    for act_dim in (1, 8):
        torch.manual_seed(0)
        algo = make_algorithm("cql", make_ctx(False, act_dim), CQL_CONFIG)
        rng = np.random.default_rng(0)
        obs = rng.normal(size=(256, OBS_DIM)).astype(np.float32)
        # env units: the box is [-2, 2] x [-1, 1] x ..., centred on 0
        actions = rng.uniform(-0.5, 0.5, size=(256, act_dim))
        batch = transitions(obs, actions, np.zeros(256))
        gaps[act_dim] = float(algo.update(batch)["cql_gap"])
    assert gaps[8] - gaps[1] == pytest.approx(7 * np.log(2), abs=0.5), gaps
