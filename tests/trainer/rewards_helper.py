"""Functions that reward specs in tests/trainer/test_rewards.py import by ``module:function``."""

from __future__ import annotations

import math

from trainer.rewards import RewardInput

NOT_A_FUNCTION = 3


def double_return(sample: RewardInput) -> float:
    """Twice the environment return."""
    assert sample.env_return is not None
    return 2.0 * sample.env_return


def says_yes(sample: RewardInput) -> float:
    """1.0 when the text says yes."""
    return 1.0 if "yes" in sample.text else 0.0


def nan_on_bad(sample: RewardInput) -> float:
    """NaN for a text 'bad', else 0."""
    return math.nan if sample.text == "bad" else 0.0


def returns_text(sample: RewardInput) -> float:
    """A broken reward: returns the text."""
    return sample.text  # type: ignore[return-value]


class Scorer:
    """A class whose static method is a reward."""

    @staticmethod
    def length(sample: RewardInput) -> float:
        return float(len(sample.text))


def always_nan(sample: RewardInput) -> float:
    """A broken reward: NaN whatever the turn."""
    return float("nan")


def prompt_chars(sample: RewardInput) -> float:
    """The length of the context the turn answers."""
    assert sample.prompt is not None
    return float(len(sample.prompt))
