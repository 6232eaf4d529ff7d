"""trainer.train: config and overrides, user errors, an end-to-end run, init-from, d3rlpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

from pipeline.store import ActionSpace, open_store
from trainer.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
)
from trainer.loop import LRFactor, Trainer
from trainer.train import main

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# --------------------------------------------------------------------------- tiny stores


def _rollouts(env_id: str, episodes: int, max_steps: int, seed: int) -> list[list[dict[str, Any]]]:
    """Episodes from a noisy scripted policy in a real gymnasium env, as JSONL step lines."""
    rng = np.random.default_rng(seed)
    env = gym.make(env_id, max_episode_steps=max_steps)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        lines = []
        for t in range(max_steps):
            if env_id.startswith("CartPole"):
                good = int(obs[2] + 0.5 * obs[3] > 0)
                act: Any = good if rng.random() > 0.3 * (ep % 3) else int(rng.integers(2))
            else:
                torque = -2.0 * obs[1] - 0.5 * obs[2] + rng.normal(0, 0.5 + ep % 3)
                act = [float(np.clip(torque, -2, 2))]
            nxt, rew, term, trunc, _ = env.step(
                act if isinstance(act, int) else np.array(act, np.float32)
            )
            line = {
                "ep": f"e{ep}",
                "t": t,
                "obs": [float(x) for x in obs],
                "act": act,
                "rew": float(rew),
                "terminal": bool(term),
                "timeout": bool(trunc),
            }
            obs = nxt
            if term or trunc:
                line["final_obs"] = [float(x) for x in obs]
                lines.append(line)
                break
            lines.append(line)
        out.append(lines)
    env.close()
    return out


def write_store(
    root: Path, kind: str = "pendulum", episodes: int = 12, max_steps: int = 30
) -> Path:
    """Build a real store (JSONL + spec through pipeline.build) under ``root``."""
    from pipeline.build import build

    env_id = "CartPole-v1" if kind == "cartpole" else "Pendulum-v1"
    raw = root / f"raw-{kind}"
    raw.mkdir(parents=True, exist_ok=True)
    with open(raw / "steps.jsonl", "w") as f:
        for ep in _rollouts(env_id, episodes, max_steps, seed=0):
            for line in ep:
                f.write(json.dumps(line) + "\n")
    if kind == "cartpole":
        action = {"path": "act", "type": "discrete", "n": 2}
        obs = {"path": "obs", "shape": [4]}
        refs = {"random": 20.0, "expert": 30.0}
    else:
        action = {"path": "act", "type": "continuous", "shape": [1], "low": -2.0, "high": 2.0}
        obs = {"path": "obs", "shape": [3]}
        refs = {"random": -250.0, "expert": -30.0, "behaviour": -150.0}
    spec = {
        "name": f"tiny-{kind}",
        "kind": "transitions",
        "source": {
            "paths": [str(raw / "*.jsonl")],
            "layout": "step_per_line",
            "episode_key": "ep",
            "step_key": "t",
        },
        "fields": {
            "observation": obs,
            "action": action,
            "reward": {"path": "rew"},
            "terminated": {"path": "terminal"},
            "truncated": {"path": "timeout"},
            "final_observation": {"path": "final_obs"},
        },
        "store": {"format": "arrow", "discount": 0.99},
        "env": {"id": env_id, "max_episode_steps": max_steps},
        "reference_returns": refs,
    }
    spec_path = root / f"{kind}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return Path(build(spec_path, root / "stores", progress=False).path)


@pytest.fixture(scope="session")
def pendulum_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("stores"), "pendulum")


@pytest.fixture(scope="session")
def cartpole_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("stores"), "cartpole", max_steps=40)


SMALL = {"hidden": [32, 32]}
SMALL_CRITIC = {"hidden": [32, 32], "critic_hidden": [32, 32]}


def tiny_config(store: Path, out: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "store": str(store),
        "out": str(out),
        "seed": 0,
        "device": "cpu",
        "num_threads": 1,
        "val_fraction": 0.2,
        "log_every": 10,
        "progress": False,
        "stages": [
            {"algo": "bc", "steps": 30, "batch_size": 32, **SMALL},
            {"algo": "iql", "steps": 30, "init": "bc", "batch_size": 32, **SMALL_CRITIC},
        ],
        "eval": {"every": 20, "episodes": 1, "val_transitions": 64},
        "checkpoint": {"every": 20, "keep_last": 2},
    }
    cfg.update(over)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# Checkpoint entries that hold wall-clock or memory figures of the process (and the run
# directory), not training state.
CLOCK_KEYS = frozenset(
    {
        "wall_time_s", "train_time_s", "metrics_offset", "time", "steps_per_s", "examples_per_s",
        "tokens_per_s", "trained_tokens_per_s", "peak_rss_mb", "eval/peak_rss_mb",
        "rollout/seconds", "rollout/generated_tokens_per_s", "eval/ms_per_question",
        "eval/full_ms_per_question", "eval/time_fraction", "baseline/ms_per_question",
        "baseline/full_ms_per_question", "baseline/time_fraction",
    }
)  # fmt: skip


def assert_same_state(
    a: Any, b: Any, where: str = "checkpoint", skip: frozenset[str] = CLOCK_KEYS
) -> None:
    """Every tensor bit for bit (``torch.equal``, same dtype and shape) and every other value
    equal, through nested dicts and lists; keys in ``skip`` and the run's ``out`` are left out."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b)
        for k in a:
            if k not in skip and k != "out":
                assert_same_state(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]", skip)
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, (where, a, b)


# --------------------------------------------------------------------------- config


def test_parse_override_reads_yaml_scalars() -> None:
    assert parse_override("seed=3") == (["seed"], 3)
    assert parse_override("stages.1.steps=1e3") == (["stages", "1", "steps"], 1000.0)
    assert parse_override("out=runs/x") == (["out"], "runs/x")
    assert parse_override("stages.0.init=null") == (["stages", "0", "init"], None)
    assert parse_override("eval.deterministic=false") == (["eval", "deterministic"], False)
    assert parse_override("stages.0.hidden=[64, 64]") == (["stages", "0", "hidden"], [64, 64])
    for bad in ("seed", "=3", "a..b=1", "x=[1,"):
        with pytest.raises(ConfigError, match="override"):
            parse_override(bad)


def test_apply_overrides_dotted_keys_and_lists() -> None:
    raw: dict[str, Any] = {
        "seed": 0,
        "stages": [{"algo": "bc", "steps": 5, "lr_schedule": "cosine"}],
    }
    apply_overrides(
        raw,
        ["seed=3", "stages.0.steps=7", "eval.episodes=2", "stages.0.lr_schedule.warmup_steps=4"],
    )
    assert raw["seed"] == 3 and raw["stages"][0]["steps"] == 7 and raw["eval"] == {"episodes": 2}
    assert raw["stages"][0]["lr_schedule"] == {"kind": "cosine", "warmup_steps": 4}
    with pytest.raises(ConfigError, match=r"stages has 1 entries \(indices 0-0\)"):
        apply_overrides(raw, ["stages.1.steps=1"])
    with pytest.raises(ConfigError, match="is a list; use an index"):
        apply_overrides(raw, ["stages.first.steps=1"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides(raw, ["seed.x=1"])


def base_raw() -> dict[str, Any]:
    return {"store": "s", "out": "o", "stages": [{"algo": "bc", "steps": 10}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sed": 1}, r"sed: unknown key \(did you mean 'seed'\?\)"),
        ({"stages": []}, "stages: must list at least one stage"),
        ({"stages": [{"algo": "bc"}]}, r"stages\.0\.steps: missing required key"),
        (
            {"stages": [{"algo": "iqll", "steps": 3}]},
            r"stages\.0\.algo: unknown algorithm 'iqll' \(did you mean 'iql'\?\)",
        ),
        ({"stages": [{"algo": "bc", "steps": 0}]}, r"stages\.0\.steps: must be an integer >= 1"),
        (
            {"stages": [{"algo": "bc", "steps": 1, "lr_schedule": "cosin"}]},
            r"lr_schedule\.kind: must be one of constant, linear, cosine",
        ),
        (
            {"stages": [{"algo": "iql", "steps": 1, "init": "bc"}]},
            r"stages\.0\.init: 'bc' is not an earlier stage; earlier stages are: none",
        ),
        ({"eval": {"every": -1}}, r"eval\.every: must be an integer >= 0"),
        ({"eval": {"epsiodes": 3}}, r"eval\.epsiodes: unknown key \(did you mean 'episodes'\?\)"),
        ({"val_fraction": 1.0}, r"val_fraction: must be in \[0, 1\)"),
        ({"device": "gpu"}, "device: must be auto, cpu, cuda or cuda:N"),
        ({"early_stopping": {"mode": "up"}}, r"early_stopping\.mode: must be one of max, min"),
        (
            {"reward": {"normalize": "zscore"}},
            r"reward\.normalize: must be one of none, return_range",
        ),
        ({"gamma": 1.5}, r"^gamma: must be in \[0, 1\], got 1\.5"),
        ({"gamma": True}, r"^gamma: must be a number \(the discount of TD targets"),
        (
            {"stages": [{"algo": "iql", "steps": 1, "gamma": -0.1}]},
            r"stages\.0\.gamma: must be in \[0, 1\]",
        ),
    ],
)
def test_config_errors_name_the_key_and_the_fix(change: dict[str, Any], message: str) -> None:
    raw = {**base_raw(), **change}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_missing_store_key_is_reported() -> None:
    with pytest.raises(ConfigError, match="store: missing required key"):
        config_from_dict({"out": "o", "stages": [{"algo": "bc", "steps": 1}]})


def test_stage_params_names_and_round_trip() -> None:
    raw = base_raw()
    raw["stages"] = [
        {"algo": "bc", "steps": 10, "hidden": [8]},
        {
            "algo": "iql",
            "steps": 5,
            "init": "bc",
            "expectile": 0.8,
            "grad_clip": 1,
            "lr_schedule": "linear",
        },
        {"algo": "iql", "steps": 5, "init": "iql", "gamma": 0.5},
    ]
    cfg = config_from_dict(raw)
    assert [s.name for s in cfg.stages] == ["bc", "iql", "iql-2"]
    assert cfg.stages[1].params == {"expectile": 0.8}
    assert cfg.stages[1].algo_config() == {"expectile": 0.8, "grad_clip": 1.0}
    # gamma is the loop's key, not a hyper-parameter: the stage's, else the run's, else the store's
    assert cfg.stages[2].gamma == 0.5 and "gamma" not in cfg.stages[2].params
    assert [cfg.stage_gamma(i, 0.99) for i in range(3)] == [0.99, 0.99, 0.5]
    assert config_from_dict({**raw, "gamma": 0.9}).stage_gamma(1, 0.99) == 0.9
    assert cfg.stages[1].lr_schedule.kind == "linear"
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="already stage 0"):
        config_from_dict(
            {
                **raw,
                "stages": [
                    {"algo": "bc", "steps": 1, "name": "x"},
                    {"algo": "iql", "steps": 1, "name": "x"},
                ],
            }
        )


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_config(bad)
    ok = write_config(tmp_path / "ok.yaml", base_raw())
    cfg = load_config(ok, ["stages.0.steps=99", "seed=4"])
    assert cfg.stages[0].steps == 99 and cfg.seed == 4
    with pytest.raises(ConfigError, match=r"ok.yaml: stages\.0\.steps: must be an integer"):
        load_config(ok, ["stages.0.steps=many"])


def test_lr_schedules() -> None:
    from trainer.config import LRSchedule

    f = LRFactor(LRSchedule("constant", warmup_steps=4), 100)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = LRFactor(LRSchedule("linear", final_fraction=0.1), 11)
    assert (
        lin(0) == pytest.approx(1.0)
        and lin(10) == pytest.approx(0.1)
        and lin(5) == pytest.approx(0.55)
    )
    cos = LRFactor(LRSchedule("cosine", warmup_steps=10), 110)
    assert cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5, abs=0.01) and cos(109) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- user errors


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_cli_user_errors_are_one_line(
    tmp_path: Path, pendulum_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config(pendulum_store, tmp_path / "run"))
    cases = [
        ([str(tmp_path / "missing.yaml")], "no such config file"),
        ([str(cfg), "sed=3"], "did you mean 'seed'"),
        ([str(cfg), "seed"], "expected key=value"),
        ([str(cfg), f"store={tmp_path / 'nostore'}"], "not a store"),
        ([str(cfg), "stages.1.expectle=0.9"], "unknown hyper-parameter 'expectle'"),
        ([str(cfg), "stages.1.algo=d3rlpy.IQLL"], "did you mean d3rlpy.IQL"),
        ([str(cfg), "--init-from", str(tmp_path / "nock.pt")], "no such checkpoint file"),
        (
            [
                str(cfg),
                "early_stopping.metric=val/nope",
                "stages.0.steps=2",
                "stages.1.steps=2",
                f"out={tmp_path / 'run-metric'}",
            ],
            "'val/nope' is not among the evaluation metrics",
        ),
        ([], "required: config"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if not argv else _nullctx():
            rc = main(argv)
            assert rc == 2, argv
        err = capsys.readouterr().err
        line = _one_error_line(err)
        assert message in line, (argv, line)
        assert line.startswith("trainer.train: error:")


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def test_existing_run_needs_resume_or_overwrite(
    tmp_path: Path, pendulum_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_config(pendulum_store, tmp_path / "run")
    raw["stages"] = [{"algo": "bc", "steps": 3, "batch_size": 8, **SMALL}]
    raw["eval"] = {"episodes": 0, "val_transitions": 16}
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main([str(cfg)]) == 0
    capsys.readouterr()
    assert main([str(cfg)]) == 2
    assert "pass --resume to continue it" in _one_error_line(capsys.readouterr().err)
    assert main([str(cfg), "seed=1", "--resume"]) == 2
    assert "`seed` differs" in _one_error_line(capsys.readouterr().err)
    assert main([str(cfg), "--overwrite"]) == 0


# --------------------------------------------------------------------------- end to end


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_end_to_end_bc_then_iql_subprocess(tmp_path: Path, pendulum_store: Path) -> None:
    run = tmp_path / "run"
    raw = tiny_config(pendulum_store, tmp_path / "ignored")
    # warm-up over the first two metric rows of the IQL stage, cosine decay over the last two
    raw["stages"][1]["lr_schedule"] = {"kind": "cosine", "warmup_steps": 25}
    raw["stages"][1].update(actor_lr=1e-3, critic_lr=1e-3, value_lr=1e-3)
    cfg = write_config(tmp_path / "c.yaml", raw)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [PY, "-m", "trainer.train", str(cfg), f"out={run}", "stages.1.steps=40"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bc" in proc.stdout and "iql" in proc.stdout

    for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["out"] == str(run) and resolved["stages"][1]["steps"] == 40
    assert resolved["store_hash"] == open_store(pendulum_store).content_hash
    assert resolved["gamma"] == 0.99  # not set: the store's discount, recorded
    assert config_from_dict(resolved).stages[1].lr_schedule.warmup_steps == 25

    rows = _rows(run)
    assert all({"step", "stage", "algo"} <= set(r) for r in rows)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60, 70]
    assert [(r["step"], r["stage"]) for r in evals] == [
        (20, "bc"),
        (30, "bc"),
        (50, "iql"),
        (70, "iql"),
    ]
    for r in evals:
        for k in ("eval/return_mean", "eval/return_std", "eval/normalized_score"):
            assert isinstance(r[k], float) and np.isfinite(r[k])
        assert any(k.startswith("val/") for k in r)
    assert all(np.isfinite(v) for r in train for k, v in r.items() if isinstance(v, float))
    from trainer.config import LRSchedule

    lrs = [r["lr"] for r in train if r["stage"] == "iql"]  # after stage steps 10, 20, 30, 40
    factor = LRFactor(LRSchedule("cosine", warmup_steps=25), 40)
    assert lrs == pytest.approx([1e-3 * factor(s) for s in (10, 20, 30, 40)], rel=1e-6)
    assert lrs[0] < lrs[1] and lrs[3] < lrs[2]  # warm-up, then cosine decay

    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["bc", "iql"]
    assert summary["total_steps"] == 70
    for s in summary["stages"]:
        assert s["final_eval"]["eval/normalized_score"] is not None
        assert s["best_eval"]["eval/normalized_score"] >= s["final_eval"]["eval/normalized_score"]
        assert s["wall_time_s"] > 0 and s["steps_per_s"] > 0
    assert summary["stages"][1]["steps"] == 40
    assert summary["reference_returns"]["behaviour_normalized_score"] == pytest.approx(
        100 * 100 / 220
    )

    ck = run / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert {"best-bc.pt", "best-iql.pt", "final-bc.pt", "final-iql.pt"} <= set(names)
    assert len([n for n in names if n.startswith("step-")]) == 2  # keep_last
    state = torch.load(ck / "final-iql.pt", weights_only=True)
    assert state["step"] == 70 and state["stage_name"] == "iql"
    assert not [p for p in ck.iterdir() if ".tmp" in p.name]


def test_init_from_checkpoint_starts_the_actor_from_bc(
    tmp_path: Path, pendulum_store: Path
) -> None:
    raw = tiny_config(pendulum_store, tmp_path / "bc")
    raw["stages"] = [{"algo": "bc", "steps": 20, "batch_size": 16, **SMALL}]
    raw["eval"] = {"episodes": 0, "every": 0}
    Trainer(config_from_dict(raw)).run()
    bc_ckpt = tmp_path / "bc" / "checkpoints" / "final-bc.pt"

    raw2 = tiny_config(pendulum_store, tmp_path / "iql", init_from=str(bc_ckpt))
    raw2["stages"] = [
        {"algo": "iql", "steps": 2, "batch_size": 16, "actor_lr": 1e-12, **SMALL_CRITIC}
    ]
    raw2["eval"] = {"episodes": 0, "every": 0}
    Trainer(config_from_dict(raw2)).run()
    bc = torch.load(bc_ckpt, weights_only=True)["algo_state"]["modules"]["actor"]
    iql = torch.load(tmp_path / "iql" / "checkpoints" / "final-iql.pt", weights_only=True)[
        "algo_state"
    ]
    for k, v in bc.items():
        torch.testing.assert_close(iql["modules"]["actor"][k], v, atol=1e-6, rtol=0)


def test_early_stopping_and_best_checkpoint(tmp_path: Path, pendulum_store: Path) -> None:
    raw = tiny_config(pendulum_store, tmp_path / "run")
    raw["stages"] = [{"algo": "bc", "steps": 100, "batch_size": 16, **SMALL}]
    raw["eval"] = {"every": 10, "episodes": 1, "val_transitions": 32}
    # The episode length never changes in Pendulum: the first evaluation stays the best.
    raw["early_stopping"] = {"metric": "eval/length_mean", "patience": 2}
    summary = Trainer(config_from_dict(raw)).run()
    st = summary["stages"][0]
    assert st["stopped_early"] and st["steps"] == 30
    assert st["best_eval"]["step"] == 10 and st["final_eval"]["step"] == 30
    best = torch.load(tmp_path / "run" / "checkpoints" / "best-bc.pt", weights_only=True)
    assert best["step"] == 10


def measured_gamma(algo: Any, batch: Any) -> float:
    """The discount of an IQL-like algorithm's TD targets, read from its ``evaluate`` alone.

    With e = Q(s, a) - r - gamma * (1 - d) * V(s'), ``td_error`` is mean(e^2); shifting every
    reward by 1 gives mean((e - 1)^2), so mean(e) = (1 - (td(r + 1) - td(r))) / 2. The
    difference of mean(e) between a batch marked terminated (no bootstrap) and the same batch
    not terminated is gamma * mean(V(s')), and ``v_mean`` of the next observations is
    mean(V(s')).
    """
    from dataclasses import replace

    def mean_error(b: Any) -> float:
        td0 = algo.evaluate(b)["td_error"]
        td1 = algo.evaluate(replace(b, rewards=b.rewards + 1.0))["td_error"]
        return (1.0 - (td1 - td0)) / 2.0

    ones, zeros = torch.ones_like(batch.terminated), torch.zeros_like(batch.terminated)
    ended = mean_error(replace(batch, terminated=ones))
    bootstrapped = mean_error(replace(batch, terminated=zeros))
    v_next = algo.evaluate(replace(batch, observations=batch.next_observations))["v_mean"]
    return (ended - bootstrapped) / v_next


def test_gamma_is_a_training_setting_that_reaches_every_algorithm(
    tmp_path: Path, pendulum_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store was built with discount 0.99; the run trains with gamma 0.5 (a stage: 0.3)."""
    from trainer import loop
    from trainer.loop import RunError

    built: dict[str, Any] = {}
    build = loop.build_algorithm

    def recording(stage: Any, ctx: Any, data: Any) -> Any:
        built[stage.name] = build(stage, ctx, data)
        return built[stage.name]

    monkeypatch.setattr(loop, "build_algorithm", recording)
    enc = {"hidden_units": [16]}
    raw = tiny_config(pendulum_store, tmp_path / "run", gamma=0.5, tensorboard=False)
    raw["stages"] = [
        {"algo": "iql", "steps": 2, "batch_size": 8, "compute_dtype": "float32", **SMALL_CRITIC},
        {"algo": "cql", "steps": 2, "batch_size": 8, "gamma": 0.3, **SMALL_CRITIC},
        {
            "algo": "d3rlpy.IQL",
            "steps": 2,
            "batch_size": 8,
            **{f"{k}_encoder_factory": enc for k in ("actor", "critic", "value")},
        },
    ]
    raw["eval"] = {"every": 0, "episodes": 0, "val_transitions": 16}
    Trainer(config_from_dict(raw)).run()
    assert open_store(pendulum_store).discount == pytest.approx(0.99)
    assert built["iql"].ctx.discount == 0.5 and built["cql"].ctx.discount == 0.3
    assert built["d3rlpy.IQL"].algo.config.gamma == 0.5  # d3rlpy's own TD targets
    # IQL's TD target r + gamma * (1 - terminated) * V(s') uses 0.5: measured from outside
    batch = loop.TransitionSampler(
        loop.load_run_data(config_from_dict(raw), torch.device("cpu")).train, 64, seed=0
    ).sample()
    assert measured_gamma(built["iql"], batch) == pytest.approx(0.5, abs=1e-3)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["gamma"] == 0.5 and resolved["stages"][1]["gamma"] == 0.3
    with pytest.raises(RunError, match="`gamma` differs"):  # it changes what is trained
        Trainer(config_from_dict({**raw, "gamma": 0.9}), resume=True).run()


def test_evaluation_does_not_move_the_training_random_streams(
    tmp_path: Path, pendulum_store: Path
) -> None:
    """CQL draws random actions every step; evaluation samples actions too (a stochastic
    policy online, CQL's validation metrics offline). Evaluating every 3 steps or only at the
    end must train the same weights."""

    def run(out: Path, every: int) -> dict[str, Any]:
        raw = tiny_config(pendulum_store, out, tensorboard=False)
        raw["stages"] = [{"algo": "cql", "steps": 12, "batch_size": 16, **SMALL_CRITIC}]
        raw["eval"] = {"every": every, "episodes": 1, "deterministic": False, "val_transitions": 32}
        Trainer(config_from_dict(raw)).run()
        return torch.load(out / "checkpoints" / "final-cql.pt", weights_only=True)

    often, at_end = run(tmp_path / "often", 3), run(tmp_path / "end", 0)
    for key in ("algo_state", "optimizers", "sampler", "rng"):
        assert_same_state(often[key], at_end[key], key)
    evals = [r for r in _rows(tmp_path / "often") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]


# --------------------------------------------------------------------------- d3rlpy


def test_mdp_dataset_keeps_every_transition(pendulum_store: Path, cartpole_store: Path) -> None:
    from trainer.d3rlpy_adapter import to_mdp_dataset
    from trainer.samplers import TransitionArrays

    for path in (pendulum_store, cartpole_store):
        store = open_store(path)
        arrays = TransitionArrays.from_store(store)
        ds = to_mdp_dataset(arrays, store.action_space)
        assert ds.transition_count == len(store)
        assert len(ds.episodes) == store.n_episodes
        ep = store.episodes
        for i, episode in enumerate(ds.episodes):
            s, n = int(ep.start[i]), int(ep.length[i])
            assert episode.transition_count == n
            assert bool(episode.terminated) == bool(ep.terminated[i])
            np.testing.assert_array_equal(episode.observations[:n], store.observations[s : s + n])
            np.testing.assert_array_equal(episode.rewards[:n, 0], store.rewards[s : s + n])
            if not ep.terminated[i]:  # the extra row is the final next_observation
                np.testing.assert_array_equal(
                    episode.observations[n], store.next_observations[s + n - 1]
                )
        if path == cartpole_store:
            assert store.episodes.terminated.any() and store.episodes.truncated.any()


def test_d3rlpy_stages_train_in_our_loop(
    tmp_path: Path, pendulum_store: Path, cartpole_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = {"hidden_units": [32, 32]}
    raw = tiny_config(pendulum_store, tmp_path / "p")
    raw["stages"] = [
        {
            "algo": "d3rlpy.BC",
            "steps": 6,
            "batch_size": 16,
            "policy_type": "stochastic",
            "encoder_factory": enc,
        },
        {
            "algo": "d3rlpy.IQL",
            "steps": 6,
            "batch_size": 16,
            "init": "d3rlpy.BC",
            "grad_clip": 1.0,
            "actor_encoder_factory": enc,
            "critic_encoder_factory": enc,
            "value_encoder_factory": enc,
        },
    ]
    raw["eval"] = {"every": 0, "episodes": 1, "val_transitions": 32}
    raw["log_every"] = 3
    from trainer import d3rlpy_adapter

    conversions: list[int] = []
    convert = d3rlpy_adapter.to_mdp_dataset

    def counted(*a: Any, **kw: Any) -> Any:
        conversions.append(1)
        return convert(*a, **kw)

    monkeypatch.setattr(d3rlpy_adapter, "to_mdp_dataset", counted)
    summary = Trainer(config_from_dict(raw)).run()
    assert conversions == []  # our sampler's batches: no d3rlpy dataset is built
    assert [s["steps"] for s in summary["stages"]] == [6, 6]
    rows = _rows(tmp_path / "p")
    ev = [r for r in rows if r["kind"] == "eval"]
    assert len(ev) == 2 and "eval/normalized_score" in ev[1] and "val/td_error" in ev[1]
    assert any("actor_loss" in r for r in rows if r["stage"] == "d3rlpy.IQL")

    raw = tiny_config(cartpole_store, tmp_path / "c")
    raw["stages"] = [
        {
            "algo": "d3rlpy.DiscreteCQL",
            "steps": 5,
            "batch_size": 16,
            "sampler": "d3rlpy",
            "encoder_factory": enc,
        }
    ]
    raw["eval"] = {"every": 0, "episodes": 1, "val_transitions": 32}
    summary = Trainer(config_from_dict(raw)).run()
    assert conversions == [1]  # d3rlpy samples: the dataset is converted, once
    ev = summary["stages"][0]["final_eval"]
    ck = torch.load(
        tmp_path / "c" / "checkpoints" / "final-d3rlpy.DiscreteCQL.pt", weights_only=True
    )
    assert ck["algo_state"]["grad_step"] == 5
    # The final evaluation is the return of the final weights, reset with eval.seed: the
    # checkpoint loaded into a fresh algorithm and rolled out by a plain loop gives it again.
    from trainer.d3rlpy_adapter import make_d3rlpy_algorithm
    from trainer.loop import algo_context

    store = open_store(cartpole_store)
    stage = config_from_dict(raw).stages[0]
    fresh = make_d3rlpy_algorithm(
        stage.algo,
        algo_context(store, torch.device("cpu"), 0.99),
        {**stage.algo_config(), "sampler": "store"},
        batch_size=16,
    )
    fresh.load_state_dict(ck["algo_state"])
    env = gym.make("CartPole-v1", max_episode_steps=40)
    obs, _ = env.reset(seed=10_000)  # eval.seed's default
    total, done = 0.0, False
    while not done:
        obs, r, term, trunc, _ = env.step(int(fresh.act(np.asarray(obs, np.float32))))
        total, done = total + float(r), term or trunc
    assert ev["eval/return_mean"] == total


# --------------------------------------------------------------------------- compare


def test_compare_groups_runs_by_config_across_seeds(
    tmp_path: Path, pendulum_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.compare import main as compare_main

    runs = []
    for lr, seed in ((1e-3, 0), (1e-3, 1), (3e-3, 0)):
        out = tmp_path / f"lr{lr}-s{seed}"
        raw = tiny_config(pendulum_store, out, seed=seed, tensorboard=False)
        raw["stages"] = [{"algo": "bc", "steps": 10, "batch_size": 16, "lr": lr, **SMALL}]
        raw["eval"] = {"every": 5, "episodes": 1, "val_transitions": 16}
        Trainer(config_from_dict(raw)).run()
        runs.append(str(out))
    png = tmp_path / "cmp.png"
    assert compare_main([*runs, "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| tiny-pendulum: bc")]
    assert len(table) == 2, printed
    by_lr = {("0.001" in line): line for line in table}
    assert "| 2 |" in by_lr[True] and "| 1 |" in by_lr[False]
    assert "stages.0.lr=" in table[0]
    assert "| tiny-pendulum: behaviour (dataset average) |" in printed
    finals = [
        json.loads((Path(r) / "summary.json").read_text())["stages"][0]["final_eval"]
        for r in runs[:2]
    ]
    mean = np.mean([f["eval/normalized_score"] for f in finals])
    assert f"{mean:.1f} ±" in by_lr[True]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert compare_main([str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from trainer.algos import CONFIGS
    from trainer.algos.base import parse_config

    cfg = load_config(path)
    assert cfg.store.startswith("stores/") and cfg.out.startswith("runs/")
    for index, stage in enumerate(cfg.stages):  # every hyper-parameter is one the algorithm knows
        if stage.is_qa:
            from trainer.qa.runner import stage_params

            stage_params(cfg, index)
        elif stage.family == "sequences":
            from trainer.agent.runner import parse_settings
            from trainer.agent.runner import stage_params as sft_params

            sft_params(cfg, index)
            parse_settings(cfg.agent)
        elif stage.is_d3rlpy:
            from trainer.d3rlpy_adapter import build_config

            space = ActionSpace("continuous", None, 1, np.array([-2.0]), np.array([2.0]))
            if stage.algo.startswith("d3rlpy.Discrete"):
                space = ActionSpace("discrete", 2, None, None, None)
            build_config(stage.algo, stage.algo_config(), space, np.zeros(3), np.ones(3), 0.99)
        else:
            parse_config(CONFIGS[stage.algo], stage.algo_config(), stage.algo)


def test_training_metrics_are_averaged_over_the_steps_that_report_them() -> None:
    from trainer.loop import mean_metrics

    buf: list[dict[str, Any]] = [
        {"q": torch.tensor(1.0), "actor": torch.tensor(4.0)},
        {"q": torch.tensor(3.0)},
        {"q": torch.tensor(5.0), "actor": torch.tensor(6.0), "f": 2.0},
    ]
    assert mean_metrics(buf) == {"q": 3.0, "actor": 5.0, "f": 2.0}
    assert mean_metrics([]) == {}


def test_d3rlpy_returns_to_go_come_from_the_store() -> None:
    """Algorithms that need returns-to-go (CalQL) get exactly the sampler's column."""
    from types import SimpleNamespace

    from d3rlpy.torch_utility import TorchMiniBatch

    from trainer.batch import TransitionBatch
    from trainer.d3rlpy_adapter import make_d3rlpy_algorithm

    space = ActionSpace("continuous", None, 2, -np.ones(2, np.float32), np.ones(2, np.float32))
    ctx = SimpleNamespace(
        obs_dim=3,
        action_space=space,
        obs_mean=np.zeros(3, np.float32),
        obs_std=np.ones(3, np.float32),
        discount=0.9,
        device=torch.device("cpu"),
    )
    algo = make_d3rlpy_algorithm("d3rlpy.CalQL", ctx, {"grad_clip": None}, batch_size=8)
    g = torch.Generator().manual_seed(0)
    b = TransitionBatch(
        torch.randn(8, 3, generator=g),
        torch.rand(8, 2, generator=g),
        torch.randn(8, generator=g),
        torch.randn(8, 3, generator=g),
        torch.zeros(8),
        torch.zeros(8),
        torch.randn(8, generator=g),
    )
    mini = algo._mini_batch(b)
    torch_batch = TorchMiniBatch.from_batch(
        mini, gamma=0.9, compute_returns_to_go=True, device="cpu:0"
    )
    torch.testing.assert_close(torch_batch.returns_to_go.reshape(-1), b.return_to_go)
    assert np.isfinite(list(algo.update(b).values())[0].item())
