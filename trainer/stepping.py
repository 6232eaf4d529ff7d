"""The plumbing of a fast gradient step: compiled loss computations and lean Adam steps.

Nothing here changes what a step computes. An algorithm hands its loss computation to
:class:`LossFunction` (run as is, or through ``torch.compile`` when its config says
``compile: true``) and its optimizers to :func:`backward_and_step`, which zeroes the
gradients, runs one backward pass, clips per network if asked, and steps every Adam with
one fused kernel call per set of hyper-parameters instead of one ``optimizer.step()``
each (whose Python bookkeeping costs more than the kernel on small networks).

Under torchrun, :func:`gradient_sync` installs the data-parallel gradient average
(trainer.distributed) that :func:`backward_and_step` runs between the backward pass and the
clipping, so every algorithm's update is data-parallel as written.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

Metrics = dict[str, torch.Tensor]
Losses = Callable[..., tuple[torch.Tensor, Metrics]]
GradientSync = Callable[[Sequence[torch.Tensor]], None]

# The gradient average of a data-parallel run, while :func:`gradient_sync` holds it.
_gradient_sync: GradientSync | None = None


@contextlib.contextmanager
def gradient_sync(sync: GradientSync | None) -> Iterator[None]:
    """Within the block, :func:`backward_and_step` hands each update's parameters to
    ``sync`` (which averages their gradients over the ranks) right after the backward pass;
    ``None``: nothing to do (one process)."""
    global _gradient_sync
    before, _gradient_sync = _gradient_sync, sync
    try:
        yield
    finally:
        _gradient_sync = before


# ----------------------------------------------------------------------------- compile
def check_bool(value: Any, field: str) -> bool:
    """A config flag: YAML's true / false only (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected true or false, got {value!r}")
    return value


class LossFunction:
    """``fn(*tensors) -> (loss, metrics)``, compiled by ``torch.compile`` when ``compile``.

    The first compiled call also runs a backward pass of the loss (``retain_graph``: the
    caller's own backward follows; the gradients it leaves are cleared by
    :func:`backward_and_step` before that), because inductor compiles the backward graph
    only when it is first used. If compiling either fails (no working C++ compiler, an
    inductor error), a warning names the cause and ``fn`` runs eagerly from then on.
    Random ops inside keep eager PyTorch's random streams (inductor's ``fallback_random``),
    so a compiled run samples what an eager one would.
    """

    def __init__(self, fn: Losses, compile: bool, name: str) -> None:
        self.fn = fn
        self.name = name
        self.compiled: Losses | None = None
        self.checked = False
        if compile:
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
            self.compiled = torch.compile(fn, dynamic=False)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if self.compiled is None:
            return self.fn(*args)
        if self.checked:
            return self.compiled(*args)
        try:
            loss, metrics = self.compiled(*args)
            if loss.requires_grad:
                loss.backward(retain_graph=True)  # compiles the backward graph now
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            cause = (str(e).strip().splitlines() or [""])[0][:300]
            warnings.warn(
                f"{self.name}: torch.compile failed ({type(e).__name__}: {cause}); training "
                "continues without compiling (set compile: false to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.compiled = None
            return self.fn(*args)
        self.checked = True
        return loss, metrics


# ----------------------------------------------------------------------------- Adam
def _lean_adam_ok(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` is a fused Adam in a state :func:`adam_step` can step by itself."""
    if type(opt) is not torch.optim.Adam:
        return False
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return False
    from torch.optim import optimizer as optim_module

    if optim_module._global_optimizer_pre_hooks or optim_module._global_optimizer_post_hooks:
        return False
    for group in opt.param_groups:
        if not group["fused"] or group["amsgrad"] or group["maximize"] or group["capturable"]:
            return False
        if group["differentiable"] or group["decoupled_weight_decay"]:
            return False
        if isinstance(group["lr"], torch.Tensor):
            return False
        for p in group["params"]:
            if p.grad is not None and not opt.state.get(p):
                return False  # first step: Adam initialises its state
    return True


def adam_step(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """``opt.step()`` for every optimizer, the same update to the last bit.

    Fused Adams whose state exists are stepped directly: one ``_foreach_add_`` on all their
    step counters, then one ``_fused_adam_`` per distinct (lr, betas, eps, weight decay),
    which is the arithmetic ``Adam.step`` runs per parameter group. Anything else (a first
    step, hooks, amsgrad, another optimizer) goes through ``opt.step()``.
    """
    # (lr, beta1, beta2, eps, weight_decay, device, dtype) ->
    #     params, grads, exp_avgs, exp_avg_sqs, steps
    lists: dict[tuple[Any, ...], tuple[list[torch.Tensor], ...]] = {}
    for opt in optimizers:
        if not _lean_adam_ok(opt):
            opt.step()
            continue
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                tensors = lists.setdefault((*hyper, p.device, p.dtype), ([], [], [], [], []))
                for out, t in zip(
                    tensors, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                ):
                    out.append(t)
        # what an LR scheduler's wrapper of opt.step() records (else it warns of a skipped step)
        opt._opt_called = True  # type: ignore[attr-defined]
    if not lists:
        return
    with torch.no_grad():
        torch._foreach_add_([s for tensors in lists.values() for s in tensors[4]], 1)
        for (lr, beta1, beta2, eps, weight_decay, _, _), tensors in lists.items():
            params, grads, exp_avgs, exp_avg_sqs, steps = tensors
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )


def backward_and_step(
    loss: torch.Tensor,
    networks: Sequence[tuple[torch.optim.Optimizer, list[nn.Parameter]]],
    grad_clip: float | None,
) -> None:
    """Zero the gradients, ``loss.backward()``, average the gradients over the ranks of a
    data-parallel run (:func:`gradient_sync`), clip each network's gradient norm to
    ``grad_clip`` (if set), and step every optimizer (:func:`adam_step`).

    ``networks`` pairs each optimizer with its network's parameters. ``loss`` may be a sum
    of several networks' losses when none depends on another's parameters: each network
    then gets exactly the gradient of its own loss, in one backward pass.
    """
    for _, params in networks:
        for p in params:
            p.grad = None
    loss.backward()
    if _gradient_sync is not None:
        _gradient_sync([p for _, params in networks for p in params])
    if grad_clip is not None:
        for _, params in networks:
            nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    adam_step([opt for opt, _ in networks])
