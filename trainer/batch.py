"""The batch type that samplers hand to algorithms.

Samplers build a :class:`TransitionBatch` with one gather from the store's contiguous
tensors; algorithms read it field by field. Observations are raw (algorithms normalise
them with the manifest statistics); rewards are already scaled if the run asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransitionBatch:
    """A mini-batch of transitions ``(s, a, r, s', terminated, truncated, G)``."""

    observations: torch.Tensor  # (B, obs_dim) float32, raw
    actions: torch.Tensor  # (B,) int64 discrete, or (B, act_dim) float32
    rewards: torch.Tensor  # (B,) float32, scaled by the sampler if configured
    next_observations: torch.Tensor  # (B, obs_dim) float32, raw
    terminated: torch.Tensor  # (B,) float32, 1.0 = the episode really ended: no bootstrap
    truncated: torch.Tensor  # (B,) float32, 1.0 = cut off (bootstrap as usual; informational)
    return_to_go: torch.Tensor  # (B,) float32, discounted return from this step

    @property
    def batch_size(self) -> int:
        return int(self.observations.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TransitionBatch:
        """The same batch on ``device`` (no copy for tensors already there)."""
        return TransitionBatch(
            observations=self.observations.to(device, non_blocking=non_blocking),
            actions=self.actions.to(device, non_blocking=non_blocking),
            rewards=self.rewards.to(device, non_blocking=non_blocking),
            next_observations=self.next_observations.to(device, non_blocking=non_blocking),
            terminated=self.terminated.to(device, non_blocking=non_blocking),
            truncated=self.truncated.to(device, non_blocking=non_blocking),
            return_to_go=self.return_to_go.to(device, non_blocking=non_blocking),
        )
