"""The reward factory (trainer/rewards.py) against plain-Python references.

Combinators and post-processors are checked with Hypothesis against loops written here
(weights, clip bounds, scale, the EMA recursion over several batches, the EMA state across a
state_dict round trip); leaves on hand examples and against sacrebleu / rouge-score called
directly; bad specs for one-line errors that name the node's YAML path.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from trainer.config import ConfigError, yaml_load
from trainer.rewards import RewardError, RewardInput, build_reward, relabel

SETTINGS = settings(max_examples=40, deadline=None)
values_st = st.floats(-1e3, 1e3, allow_nan=False)
batch_st = st.lists(values_st, min_size=1, max_size=8)


def col_samples(**cols: list[float]) -> list[RewardInput]:
    """Samples whose `columns` hold the given per-sample values."""
    n = len(next(iter(cols.values())))
    return [RewardInput(text="", columns={k: v[i] for k, v in cols.items()}) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Plain references
# --------------------------------------------------------------------------------------------


def ref_clip(x: float, lo: float | None, hi: float | None) -> float:
    if lo is not None and x < lo:
        x = lo
    if hi is not None and x > hi:
        x = hi
    return x


def ref_scale(x: float, mul: float, add: float) -> float:
    return x * mul + add


class RefEma:
    """The documented recursion, one batch at a time: update with the batch, then normalise."""

    def __init__(self, decay: float, eps: float) -> None:
        self.decay, self.eps = decay, eps
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def __call__(self, xs: list[float]) -> list[float]:
        b = sum(xs) / len(xs)
        s = sum((x - b) ** 2 for x in xs) / len(xs)
        if self.count == 0:
            self.mean, self.var = b, s
        else:
            self.mean = self.decay * self.mean + (1 - self.decay) * b
            self.var = self.decay * self.var + (1 - self.decay) * s
        self.count += 1
        return [(x - self.mean) / math.sqrt(self.var + self.eps) for x in xs]


# --------------------------------------------------------------------------------------------
# Combinators and post-processors (Hypothesis)
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.tuples(
            st.lists(st.floats(-10, 10, allow_nan=False), min_size=k, max_size=k),
            st.lists(st.lists(values_st, min_size=k, max_size=k), min_size=1, max_size=6),
        )
    )
)
def test_weighted_sum_is_the_weighted_sum_of_its_components(case):
    weights, rows = case
    names = [f"c{i}" for i in range(len(weights))]
    spec = {
        "type": "weighted_sum",
        "components": [{"weight": w, "reward": {"column": c}} for w, c in zip(weights, names)],
    }
    node = build_reward(spec)
    samples = [RewardInput(text="", columns=dict(zip(names, row))) for row in rows]
    total, logs = node.evaluate(samples)
    expected = [sum(w * v for w, v in zip(weights, row)) for row in rows]
    np.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(logs["reward/total"], total)
    for i, (w, c) in enumerate(zip(weights, names)):
        np.testing.assert_array_equal(logs[f"reward/{c}"], [row[i] for row in rows])
        np.testing.assert_array_equal(logs[f"reward_weight/{c}"], [w] * len(rows))
    # the same tree relabels named columns to the same values
    columns = {c: np.array([row[i] for row in rows]) for i, c in enumerate(names)}
    np.testing.assert_array_equal(relabel(build_reward(spec), columns), total)


@SETTINGS
@given(batch_st, values_st, values_st, st.booleans(), st.booleans())
def test_clip_keeps_values_inside_its_bounds(xs, a, b, open_lo, open_hi):
    lo, hi = min(a, b), max(a, b)
    lo_, hi_ = (None if open_lo else lo), (None if open_hi else hi)
    node = build_reward({"column": "x", "post": [{"clip": [lo_, hi_]}]})
    total, logs = node.evaluate(col_samples(x=xs))
    assert total.tolist() == [ref_clip(x, lo_, hi_) for x in xs]
    assert logs["reward_raw/x"].tolist() == xs  # before the post-processors
    assert logs["reward/x"].tolist() == total.tolist()  # after


@SETTINGS
@given(batch_st, st.floats(-5, 5, allow_nan=False), st.floats(-5, 5, allow_nan=False))
def test_scale_multiplies_then_adds(xs, mul, add):
    node = build_reward({"column": "x", "post": [{"scale": {"mul": mul, "add": add}}]})
    assert node(col_samples(x=xs)).tolist() == [ref_scale(x, mul, add) for x in xs]


post_st = st.one_of(
    st.tuples(st.just("clip"), values_st, values_st).map(
        lambda t: {"clip": [min(t[1], t[2]), max(t[1], t[2])]}
    ),
    st.tuples(st.just("scale"), st.floats(-3, 3), st.floats(-3, 3)).map(
        lambda t: {"scale": {"mul": t[1], "add": t[2]}}
    ),
)


@SETTINGS
@given(batch_st, st.lists(post_st, min_size=1, max_size=4))
def test_post_processors_apply_in_the_order_listed(xs, post):
    node = build_reward({"column": "x", "post": post})
    expected = []
    for x in xs:
        for op in post:
            if "clip" in op:
                x = ref_clip(x, *op["clip"])
            else:
                x = ref_scale(x, op["scale"]["mul"], op["scale"]["add"])
        expected.append(x)
    np.testing.assert_allclose(node(col_samples(x=xs)), expected, rtol=1e-12, atol=1e-9)


@SETTINGS
@given(
    st.lists(batch_st, min_size=1, max_size=6),
    st.floats(0.01, 0.99),
    st.floats(1e-3, 1.0),
)
def test_ema_normalize_follows_the_documented_recursion(batches, decay, eps):
    node = build_reward({"column": "x", "post": [{"ema_normalize": {"decay": decay, "eps": eps}}]})
    ref = RefEma(decay, eps)
    for xs in batches:
        np.testing.assert_allclose(node(col_samples(x=xs)), ref(xs), rtol=1e-9, atol=1e-9)
    state = node.state_dict()["reward.post[0]"]
    assert state["count"] == len(batches)
    np.testing.assert_allclose([state["mean"], state["var"]], [ref.mean, ref.var], rtol=1e-9)


@SETTINGS
@given(st.lists(batch_st, min_size=10, max_size=10), st.floats(0.01, 0.99))
def test_ema_state_survives_a_checkpoint_and_resume(batches, decay):
    spec = {
        "type": "weighted_sum",
        "components": [
            {"weight": 1.0, "reward": {"column": "a", "post": [{"ema_normalize": {"decay": 0.9}}]}},
            {"weight": -0.5, "reward": {"column": "b"}},
        ],
        "post": [{"clip": [-5, 5]}, {"ema_normalize": {"decay": decay}}],
    }
    data = [col_samples(a=xs, b=[2 * x + 1 for x in xs]) for xs in batches]
    straight = build_reward(spec)
    want = [straight(batch) for batch in data]

    first = build_reward(spec)
    got = [first(batch) for batch in data[:5]]
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = build_reward(spec)
    resumed.load_state_dict(saved)
    got += [resumed(batch) for batch in data[5:]]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    # and a fresh tree (no load) does not continue the recursion
    fresh = build_reward(spec)
    assert straight.state_dict() != fresh.state_dict()


def test_ema_without_update_keeps_its_state():
    node = build_reward({"column": "x", "post": ["ema_normalize"]})
    node(col_samples(x=[1.0, 2.0, 3.0]))
    before = node.state_dict()
    frozen = node(col_samples(x=[10.0, 20.0]), update=False)
    assert node.state_dict() == before
    mean, var = before["reward.post[0]"]["mean"], before["reward.post[0]"]["var"]
    np.testing.assert_allclose(frozen, (np.array([10.0, 20.0]) - mean) / np.sqrt(var + 1e-8))
    assert node(col_samples(x=[])).shape == (0,)
    assert node.state_dict() == before  # an empty batch changes nothing


def test_load_state_dict_refuses_a_state_from_another_spec():
    node = build_reward({"column": "x", "post": ["ema_normalize"]})
    with pytest.raises(ValueError, match=r"missing \['reward.post\[0\]'\]"):
        node.load_state_dict({})


def test_nested_sum_with_post_on_an_inner_node():
    spec = yaml_load(
        """
        type: weighted_sum
        components:
          - {weight: 2.0, name: inner, reward: {type: weighted_sum, post: [{clip: [0, 1]}],
             components: [{weight: 1.0, reward: env_return}, {weight: 0.5, reward: success}]}}
          - {weight: -0.1, reward: {length: {unit: chars}}}
        post: [{scale: {mul: 10, add: 1}}]
        """
    )
    rows = [("abcd", 0.2, True), ("ab", 3.0, False), ("", -1.0, 1.0)]
    samples = [RewardInput(text=t, env_return=r, success=s) for t, r, s in rows]
    total, logs = build_reward(spec).evaluate(samples)
    inner = [ref_clip(r + 0.5 * float(s), 0, 1) for _, r, s in rows]
    expected = [(2.0 * i - 0.1 * len(t)) * 10 + 1 for i, (t, _, _) in zip(inner, rows)]
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    np.testing.assert_allclose(logs["reward/inner"], inner)
    assert logs["reward_weight/inner"].tolist() == [2.0] * 3
    assert logs["reward_weight/success"].tolist() == [0.5] * 3
    assert set(logs) == {
        "reward/total",
        "reward_raw/total",
        "reward/inner",
        "reward_raw/inner",
        "reward_weight/inner",
        "reward/env_return",
        "reward_weight/env_return",
        "reward/success",
        "reward_weight/success",
        "reward/length",
        "reward_weight/length",
    }


def test_names_default_to_the_type_and_clashes_are_numbered():
    node = build_reward(
        {
            "type": "weighted_sum",
            "components": [
                {"weight": 1, "reward": "success"},
                {"weight": 1, "reward": {"format": {"pattern": "a"}}},
                {"weight": 1, "reward": {"format": {"pattern": "b"}}},
                {"weight": 1, "reward": {"python": "tests.trainer.rewards_helper:says_yes"}},
                {"weight": 1, "reward": {"type": "column", "name": "r_env"}},
                {"weight": 1, "name": "mine", "reward": "success"},
            ],
        }
    )
    names = [n.name for n in node.nodes()]
    assert names == ["total", "success", "format_1", "format_2", "says_yes", "r_env", "mine"]
    assert build_reward("success").name == "success"  # a leaf at the root keeps its type


# --------------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------------


def one(spec, **fields) -> float:
    return float(build_reward(spec)([RewardInput(**{"text": "", **fields})])[0])


def test_env_return_and_success():
    assert one("env_return", env_return=-2.5) == -2.5
    assert one({"type": "success"}, success=True) == 1.0
    assert one("success", success=False) == 0.0
    assert one("success", success=0.25) == 0.25


def test_exact_match_and_token_f1_use_squad_normalisation():
    assert one("exact_match", text="The Cat!", target="cat") == 1.0
    assert one("exact_match", text="a cat", target="dog") == 0.0
    # "the cat sat" -> [cat, sat]; "cat sat down" -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    assert one("token_f1", text="the cat sat", target="Cat sat, down.") == pytest.approx(0.8)
    assert one("token_f1", text="", target="") == 1.0
    assert one("token_f1", text="x", target="y") == 0.0


def test_bleu_is_sacrebleus_sentence_bleu_over_100():
    pairs = [
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("the cat sat on mat", "the cat sat on the mat"),
        ("a dog", "the cat sat on the mat"),
        ("", "anything"),
    ]
    node = build_reward("bleu")
    got = node([RewardInput(text=h, target=r) for h, r in pairs])
    want = [sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(1.0)
    char = build_reward({"bleu": {"tokenize": "char", "smooth_method": "floor"}})
    assert char([RewardInput(text="abcd", target="abce")])[0] == pytest.approx(
        sacrebleu.sentence_bleu("abcd", ["abce"], tokenize="char", smooth_method="floor").score
        / 100
    )


def test_rouge_l_is_rouge_scores_f_measure():
    pairs = [
        ("the cat on the mat", "the cat sat on the mat"),
        ("running dogs", "the dog runs"),
        ("", "x"),
    ]
    got = build_reward("rouge_l")([RewardInput(text=h, target=r) for h, r in pairs])
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = [scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # LCS 5 of 5 predicted and 6 target tokens: P 1, R 5/6, F 10/11
    assert got[0] == pytest.approx(10 / 11)
    stem = build_reward({"rouge_l": {"use_stemmer": True}})
    assert stem([RewardInput(text="dogs run", target="dog running")])[0] == pytest.approx(1.0)


def test_length_units():
    text = "two  words\n"
    assert one({"length": {"unit": "chars"}}, text=text) == 11.0
    assert one({"type": "length", "unit": "words"}, text=text) == 2.0
    assert one("length", text=text, n_tokens=7) == 7.0  # tokens by default
    with pytest.raises(RewardError, match=r"reward/length needs the sample's n_tokens; sample 0"):
        one("length", text=text)


def test_format_searches_the_regex_across_lines():
    spec = {"format": {"pattern": "<action>(.+)</action>"}}
    assert one(spec, text="<think>\nhm</think><action>go\nnorth</action>") == 1.0
    assert one(spec, text="<action></action>") == 0.0
    assert one({"type": "format", "pattern": "[0-9]+"}, text="step 42 done") == 1.0
    assert one({"type": "format", "pattern": "[0-9]+", "full": True}, text="step 42") == 0.0
    assert one({"type": "format", "pattern": "[0-9]+", "full": True}, text="42") == 1.0


def test_python_leaf_imports_the_users_function():
    assert one({"python": "tests.trainer.rewards_helper:double_return"}, env_return=1.5) == 3.0
    spec = {"type": "python", "function": "tests.trainer.rewards_helper:Scorer.length"}
    assert one(spec, text="abc") == 3.0
    with pytest.raises(RewardError, match=r"returned 'oops' for sample 0; it must return a float"):
        one({"python": "tests.trainer.rewards_helper:returns_text"}, text="oops")


def test_text_leaves_need_a_target():
    with pytest.raises(RewardError, match=r"reward/bleu needs the sample's target; sample 1 has"):
        build_reward("bleu")([RewardInput(text="a", target="a"), RewardInput(text="a")])


def test_nan_and_inf_name_the_component_and_the_sample():
    spec = {
        "type": "weighted_sum",
        "components": [
            {"weight": 1, "reward": "success"},
            {
                "weight": 1,
                "name": "judge",
                "reward": {"python": "tests.trainer.rewards_helper:nan_on_bad"},
            },
        ],
    }
    samples = [RewardInput(text=t, success=1) for t in ["ok", "ok", "ok", "bad"]]
    with pytest.raises(RewardError, match=r"^reward/judge produced NaN for sample 3 ") as err:
        build_reward(spec)(samples)
    assert err.value.component == "reward/judge" and err.value.sample == 3
    overflow = build_reward({"column": "x", "post": [{"scale": {"mul": 1e300}}]})
    with pytest.raises(RewardError, match=r"^reward/x produced inf for sample 1 \(reward.post"):
        overflow(col_samples(x=[0.0, 1e10]))


# --------------------------------------------------------------------------------------------
# Relabelling a transition store
# --------------------------------------------------------------------------------------------


def test_relabel_reads_named_reward_columns():
    spec = yaml_load(
        """
        type: weighted_sum
        components:
          - {weight: 1.0, reward: {type: column, name: reward}}
          - {weight: 0.5, reward: {type: column, name: r_shaping, post: [{clip: [-1, 1]}]}}
        """
    )
    columns = {"reward": np.array([1.0, 0.0, 2.0]), "r_shaping": np.array([3.0, -0.5, -4.0])}
    out = relabel(build_reward(spec, where="iql.yaml: reward"), columns)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.5, -0.25, 1.5])
    assert columns["reward"].tolist() == [1.0, 0.0, 2.0]  # the store's columns are untouched


def test_relabel_refuses_text_leaves_and_missing_columns():
    spec = {"type": "weighted_sum", "components": [{"weight": 1, "reward": "bleu"}]}
    with pytest.raises(ConfigError, match=r"^reward.components\[0\].reward: leaf 'bleu' cannot"):
        relabel(build_reward(spec), {"reward": np.zeros(2)})
    with pytest.raises(
        ConfigError, match=r"^reward: no reward column 'r_x'; the columns are: a, b"
    ):
        relabel(build_reward({"column": "r_x"}), {"a": np.zeros(2), "b": np.zeros(2)})


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the node's path
# --------------------------------------------------------------------------------------------

BAD = [
    (
        {
            "type": "weighted_sum",
            "components": [{"weight": 1, "reward": "success"}, {"weight": 1, "reward": "sucess"}],
        },
        r"^reward.components\[1\].reward: unknown leaf 'sucess' \(did you mean 'success'\?\); "
        r"known: bleu, column, env_return",
    ),
    ({"type": "bleuu"}, r"^reward: unknown leaf 'bleuu' \(did you mean 'bleu'\?\)"),
    (
        {"type": "weighted_sum", "components": [{"weight": "heavy", "reward": "success"}]},
        r"^reward.components\[0\].weight: weight must be a finite number, got 'heavy'",
    ),
    (
        {"type": "weighted_sum", "components": [{"weight": float("nan"), "reward": "success"}]},
        r"^reward.components\[0\].weight: weight must be a finite number, got nan",
    ),
    (
        {"type": "weighted_sum", "components": [{"weight": True, "reward": "success"}]},
        r"^reward.components\[0\].weight: weight must be a finite number, got True",
    ),
    ({"type": "weighted_sum", "components": []}, r"^reward.components: give a non-empty list"),
    (
        {"python": "tests.trainer.no_such_module:f"},
        r"^reward.function: cannot import module 'tests.trainer.no_such_module' "
        r"\(ModuleNotFoundError",
    ),
    (
        {"python": "tests.trainer.rewards_helper:missing"},
        r"^reward.function: 'tests.trainer.rewards_helper:missing': .* has no attribute 'missing'",
    ),
    (
        {"python": "tests.trainer.rewards_helper:NOT_A_FUNCTION"},
        r"^reward.function: .* is a int, not a function fn\(sample: RewardInput\) -> float",
    ),
    ({"python": "no_colon"}, r"^reward.function: write the function as 'module:function'"),
    (
        {"column": "x", "post": [{"scale": {"mul": 2}}, {"clip": [1, -1]}]},
        r"^reward.post\[1\].clip: LO 1 > HI -1; write \[LO, HI\] with LO <= HI",
    ),
    ({"column": "x", "post": [{"clip": [0]}]}, r"^reward.post\[0\].clip: write \[LO, HI\]"),
    (
        {"column": "x", "post": [{"ema_normalize": {"decay": 1.0}}]},
        r"^reward.post\[0\].ema_normalize.decay: 1.0 is not in \(0, 1\)",
    ),
    (
        {"column": "x", "post": [{"ema_normalize": {"decay": 0}}]},
        r"^reward.post\[0\].ema_normalize.decay: 0 is not in \(0, 1\)",
    ),
    (
        {"column": "x", "post": [{"ema_normalise": {}}]},
        r"^reward.post\[0\]: unknown post-processor 'ema_normalise' \(did you mean 'ema_normalize'",
    ),
    ({"format": {"pattern": "(unclosed"}}, r"^reward.pattern: invalid regex '\(unclosed'"),
    ({"length": {"unit": "bytes"}}, r"^reward.unit: unknown unit 'bytes'; known: chars, tokens"),
    ({"type": "success", "weight": 2}, r"^reward: unknown key 'weight' for success; known: none"),
    ({"bleu": {"tokenize": "14a"}}, r"^reward.tokenize: unknown tokenizer '14a'"),
    (
        {
            "type": "weighted_sum",
            "components": [
                {"weight": 1, "name": "a", "reward": "success"},
                {"weight": 1, "name": "a", "reward": "env_return"},
            ],
        },
        r"^reward.components\[1\].reward: name 'a' is also the name of reward.components\[0\]",
    ),
]


@pytest.mark.parametrize(("spec", "pattern"), BAD)
def test_bad_specs_fail_on_one_line_naming_the_path(spec, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        build_reward(spec)
    assert "\n" not in str(err.value)


def test_where_prefixes_every_message():
    with pytest.raises(ConfigError, match=r"^configs/x.yaml: stages.1.reward: unknown leaf 'f1'"):
        build_reward("f1", where="configs/x.yaml: stages.1.reward")


# --------------------------------------------------------------------------------------------
# The documented example, and no torch at import
# --------------------------------------------------------------------------------------------


def test_the_docstring_example_builds_and_runs():
    spec = yaml_load(
        """
        type: weighted_sum
        components:
          - {weight: 1.0, reward: success}
          - {weight: 0.1, reward: {format: {pattern: "<action>.+</action>"}}}
          - {weight: -0.01, reward: {length: {unit: tokens}}}
        post: [{clip: [-1, 2]}, {ema_normalize: {decay: 0.99}}]
        """
    )
    node = build_reward(spec)
    samples = [
        RewardInput(text="<action>go</action>", success=True, n_tokens=10),
        RewardInput(text="nothing", success=False, n_tokens=50),
    ]
    total, logs = node.evaluate(samples)
    raw = [1.0 + 0.1 - 0.1, 0.0 - 0.5]
    np.testing.assert_allclose(logs["reward_raw/total"], raw)
    np.testing.assert_allclose(total, RefEma(0.99, 1e-8)(raw), rtol=1e-9)


def test_importing_the_module_does_not_import_torch():
    code = "import sys, trainer.rewards; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_text_rewards_leaves_pythons_random_stream_alone():
    """A run checkpoints Python's random stream; rouge-score's first import draws from it, so
    a resumed run (which had imported it already) would otherwise not be the same run."""
    code = (
        "import random; random.seed(0); s = random.getstate()\n"
        "from trainer.rewards import RewardInput, build_reward\n"
        "r = build_reward({'type': 'weighted_sum', 'components': ["
        "{'weight': 1.0, 'reward': 'rouge_l'}, {'weight': 1.0, 'reward': 'bleu'}]})\n"
        "r([RewardInput(text='a b c', target='a b d')])\n"
        "assert random.getstate() == s, 'the random stream moved'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
