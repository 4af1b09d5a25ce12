"""One typed, frozen configuration for a training run, and its validation.

Everything a run needs lives in :class:`TrainConfig` (CleanRL's ``Args`` idea, but one place for every
algorithm). :func:`validate` checks every value and every combination *before* any work starts, and raises
:class:`ConfigError` with one line that names the offending option -- the CLI prints that line and exits with
status 2. Defaults are the small, fast main job of the README.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Collection, Literal

ALGOS = ("dqn", "double_dqn", "a2c", "reinforce")
STRATEGIES = ("single", "sync", "async", "dpsgd", "hogwild")
RUNTIMES = ("vmap", "devices", "async_sim", "mpi", "distributed")
TORSOS = ("auto", "mlp", "nature", "a3c")
CNN_TORSOS = ("nature", "a3c")  # read frames (C, H, W)
CRITICS = ("shared", "separate")
INT32_MAX = 2**31 - 1
DELAY_KINDS = ("fixed", "uniform", "geometric", "zipf")
LOSSES = ("auto", "mse", "huber")
PIPELINES = ("fused", "overlap")


# DQN on Atari: the values of Mnih et al. (2015) as CleanRL's dqn_atari uses them. The dataclass defaults are for
# vector observations (CartPole-sized problems); the CLI applies these to the options not given when --env is an
# Atari game and --algo a DQN (see atari_dqn_defaults).
ATARI_DQN_DEFAULTS = {
    "lr": 1e-4,
    "batch_size": 32,
    "learning_starts": 80_000,
    "train_frequency": 4,
    "target_update": 1_000,
    "eps_end": 0.01,
    "eps_fraction": 0.1,
}


# The options a run can sweep as one vmapped program, each run with its own value (jaxdp.train.Hyperparams): the
# config field and its flag. The ε schedule is DQN's; the loss weights are A2C's and REINFORCE's; --max-delay is
# the stale-gradient delay of --strategy async --delay fixed.
SWEEPABLE = {"lr": "--lr", "gamma": "--gamma", "eps_start": "--eps-start", "eps_end": "--eps-end",
             "eps_fraction": "--eps-fraction", "ent_coef": "--ent-coef", "vf_coef": "--vf-coef",
             "max_delay": "--max-delay"}


class ConfigError(ValueError):
    """A bad option or combination of options; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train.
    algo: Literal["dqn", "double_dqn", "a2c", "reinforce"] = "a2c"
    env: str = "CartPole-v1"
    total_steps: int = 500_000  # environment steps per seed, summed over all workers and their envs
    num_envs: int = 0  # per worker; 0 = the algorithm's default
    seeds: tuple[int, ...] = (0,)
    # Hyperparameter sweep: ((field, values), ...) over fields of SWEEPABLE. The run trains every combination of the
    # values (the grid) with every seed, as one vmapped program; a swept field's own value above is not used.
    sweep: tuple[tuple[str, tuple[float, ...]], ...] = ()

    # Optimizer (the inner optax chain every strategy wraps).
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    # None = the algorithm's default (dqn 2.5e-4, 1e-4 on Atari; a2c/reinforce 2e-3). 0 is a rate of 0, a control
    # that does not learn: it once meant the default, so `--lr 0 1e-3` swept the default under the label "--lr 0".
    lr: float | None = None
    anneal_lr: str = "auto"  # linear decay to 0 over the run: auto = on for a2c/reinforce, off for DQN (CleanRL's)
    max_grad_norm: float = -1.0  # -1 = the algorithm's default (a2c/reinforce 0.5, dqn 10); 0 = off
    gamma: float = 0.99

    # Network.
    torso: str = "auto"  # mlp for vector observations, nature for Atari
    hidden: tuple[int, ...] = (64, 64)
    layer_norm: bool = False
    # A2C / REINFORCE: shared = one torso under the policy and value heads (CleanRL's and PureJaxRL's Atari agents);
    # separate = the value reads a torso of its own (their classic-control agents; see nets.ActorCritic).
    critic: Literal["shared", "separate"] = "shared"

    # DQN / Double DQN.
    buffer_size: int = 0  # 0 = 10k transitions for vector observations, 1M for Atari (7 GB of uint8 frames)
    batch_size: int = 128
    learning_starts: int = 10_000
    train_frequency: int = 10  # env steps (all envs together) per gradient update
    target_update: int = 500  # env steps between hard target copies; ignored when tau < 1
    tau: float = 1.0
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.5
    n_step: int = 1
    loss: str = "auto"  # auto: huber for Atari (clipped rewards), mse for vector observations
    replay: bool = True  # False: learn from the latest transitions only (the lecture's ablation)
    target_network: bool = True  # False: bootstrap from the online network (the lecture's ablation)

    # A2C / REINFORCE.
    rollout_len: int = 0  # 0 = the algorithm's default (a2c: 8, reinforce: 500)
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    # REINFORCE's baseline: the batch's mean return (the lecture's vanilla REINFORCE). A learned value baseline makes
    # one update per 500-step rollout, too few to fit V: it ended CartPole at 50 and Acrobot at -489, where the mean
    # reached 415 and -109 (seeds 0-3, 500k steps, lr 2e-3; see the README).
    baseline: Literal["value", "mean", "none"] = "mean"

    # How acting and learning share the machine (see jaxdp.train.make_train): fused = act, then learn, in one
    # program; overlap = an actor thread acts with parameters one update old while the learner updates (Cleanba).
    pipeline: str = "fused"

    # How workers cooperate (see jaxdp.strategies) and where they run (see jaxdp.runtime).
    strategy: str = "single"
    runtime: str = "vmap"
    workers: int = 1
    local_steps: int = 1  # B
    master_batch: int = 1  # M
    global_lr: float = 1.0  # the master's outer step size on the update vector
    delay: str = "uniform"  # async: the delay distribution
    max_delay: int = 4
    threads: int = 1  # hogwild threads per worker
    comm_time: float = 0.0  # async_sim: one-way message time, in env steps of one env
    overwrite_prob: float = 0.0
    # --runtime distributed (jax.distributed): all three, or none to let JAX detect them (SLURM, TPU pods).
    coordinator: str = ""  # HOST:PORT of process 0
    num_processes: int = 0
    process_id: int = -1

    # Outputs.
    logdir: str = ""  # "" = runs/<algo>_<env>_<strategy>_<time>
    log_interval: float = 2.0  # seconds between log points
    checkpoint_interval: float = 60.0  # seconds between checkpoints
    resume: bool = False
    eval_episodes: int = 10
    # Probability of a uniformly random action in those games: 0 = greedy; 0.05 is the Nature-DQN protocol.
    eval_epsilon: float = 0.0
    progress: bool = True
    tensorboard: bool = True

    # ---- derived values -------------------------------------------------------------------------
    @property
    def is_dqn(self) -> bool:
        return self.algo in ("dqn", "double_dqn")

    @property
    def grid(self) -> tuple[dict[str, float], ...]:
        """The sweep's points: every combination of the swept values, the first swept field varying slowest
        (``({},)`` without a sweep)."""
        names = [name for name, _ in self.sweep]
        return tuple(dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.sweep)))

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """``(grid point, seed)`` of every run, point-major: lane ``r`` of the vmapped program trains ``runs[r]``
        (without a sweep, the seeds in order)."""
        return tuple((point, seed) for point in range(len(self.grid)) for seed in self.seeds)

    def point_config(self, point: int) -> TrainConfig:
        """The config of grid point ``point`` (its swept values set, no sweep), with every seed."""
        return dataclasses.replace(self, sweep=(), **self.grid[point])

    @property
    def build_config(self) -> TrainConfig:
        """The config a sweep's shared program is built from: a swept ``max_delay`` at its largest value, which
        sizes the ring of gradients in flight that every lane's delay fits in (the config itself otherwise)."""
        swept = dict(self.sweep)
        return dataclasses.replace(self, max_delay=max(swept["max_delay"])) if "max_delay" in swept else self

    def run_config(self, run: int) -> TrainConfig:
        """The single-seed config that run ``run`` of the sweep equals (lane ``run`` plays its envs, from its key)."""
        point, seed = self.runs[run]
        return dataclasses.replace(self.point_config(point), seeds=(seed,))

    @property
    def envs_per_worker(self) -> int:
        if self.num_envs:
            return self.num_envs
        return {"dqn": 4, "double_dqn": 4, "a2c": 16, "reinforce": 8}[self.algo]

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"dqn": 2.5e-4, "double_dqn": 2.5e-4, "a2c": 2e-3, "reinforce": 2e-3}[self.algo]

    @property
    def anneals_lr(self) -> bool:
        return self.anneal_lr == "on" or (self.anneal_lr == "auto" and not self.is_dqn)

    @property
    def grad_clip(self) -> float:
        if self.max_grad_norm >= 0:
            return self.max_grad_norm
        return 10.0 if self.is_dqn else 0.5

    def torso_for(self, is_atari: bool) -> str:
        """The torso this run builds: ``--torso``, or for ``auto`` the Nature CNN on Atari frames, else the MLP."""
        if self.torso != "auto":
            return self.torso
        return "nature" if is_atari else "mlp"

    def replay_capacity(self, is_atari: bool) -> int:
        if self.buffer_size:
            return self.buffer_size
        return 1_000_000 if is_atari else 10_000

    @property
    def rollout(self) -> int:
        if self.rollout_len:
            return self.rollout_len
        return {"a2c": 8, "reinforce": 500}.get(self.algo, 1)

    @property
    def steps_per_iteration(self) -> int:
        """Environment steps (all workers, all envs of one seed) taken by one iteration of the loop."""
        e = self.envs_per_worker * self.workers
        if self.is_dqn:
            return e * self.env_steps_per_update
        return e * self.rollout

    @property
    def env_steps_per_update(self) -> int:
        """DQN: vectorised env steps between two gradient updates (train_frequency counts single steps)."""
        return max(1, round(self.train_frequency / self.envs_per_worker))

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_steps // self.steps_per_iteration)

    @property
    def acting_only_iterations(self) -> int:
        """Loop iterations that act without learning: DQN's random play before ``learning_starts``, and with
        ``pipeline="overlap"`` one more -- the first data is learned while the next is being collected."""
        warmup = self.learning_starts // self.steps_per_iteration if self.is_dqn else 0
        return warmup + (1 if self.pipeline == "overlap" else 0)

    @property
    def learning_iterations(self) -> int:
        """Loop iterations that learn (at least one): those after :attr:`acting_only_iterations`."""
        return max(1, self.num_iterations - self.acting_only_iterations)


def _fail(msg: str) -> None:
    raise ConfigError(msg)


# The options only some agents read: (fields, the agents that read them, who they are in a message).
AGENT_OPTIONS = (
    (("buffer_size", "batch_size", "learning_starts", "train_frequency", "target_update", "tau", "eps_start",
      "eps_end", "eps_fraction", "n_step", "loss", "replay", "target_network"), ("dqn", "double_dqn"), "DQN"),
    (("rollout_len", "ent_coef", "vf_coef", "critic"), ("a2c", "reinforce"), "A2C / REINFORCE"),
    (("baseline",), ("reinforce",), "REINFORCE"),
)


def options_not_read(cfg: TrainConfig, given: Collection[str] = ()) -> list[tuple[str, str]]:
    """(field, owner) of each option, set away from its default or named in ``given`` (the fields a command line
    gave, whatever their values), that ``cfg.algo`` does not read (``--eps-start`` for A2C, ``--rollout-len`` for
    DQN). The CLI refuses them, as each of CleanRL's scripts takes only its own flags; ``validate`` does not, so
    that Python code may build every agent's config from one dict."""
    defaults = TrainConfig()
    return [(field, owner) for fields, algos, owner in AGENT_OPTIONS if cfg.algo not in algos
            for field in fields if getattr(cfg, field) != getattr(defaults, field) or field in given]


_SIMULATED_DELAYS = ("--strategy async on --runtime vmap or devices (simulated stale gradients; on async_sim and mpi "
                     "the staleness is the workers' own)",
                     lambda c: c.strategy == "async" and c.runtime in ("vmap", "devices"))
# The strategies' and runtimes' own options: (field, who reads it, whether this run does).
STRATEGY_OPTIONS = (
    ("global_lr", "--strategy dpsgd, and --strategy async on --runtime async_sim or mpi (the master's step size)",
     lambda c: c.strategy == "dpsgd" or (c.strategy == "async" and c.runtime in ("async_sim", "mpi"))),
    ("delay", *_SIMULATED_DELAYS),
    ("max_delay", *_SIMULATED_DELAYS),
    ("threads", "--strategy hogwild", lambda c: c.strategy == "hogwild"),
    ("overwrite_prob", "--strategy hogwild", lambda c: c.strategy == "hogwild"),
    ("comm_time", "--runtime async_sim", lambda c: c.runtime == "async_sim"),
    # B and M: validate refuses them away from 1 where they are not read; given as 1, they are refused here.
    ("local_steps", "--strategy dpsgd", lambda c: c.strategy == "dpsgd"),
    ("master_batch", "an asynchronous master (--strategy async or dpsgd on --runtime async_sim or mpi)",
     lambda c: c.strategy in ("async", "dpsgd") and c.runtime in ("async_sim", "mpi")),
)


def strategy_options_not_read(cfg: TrainConfig, given: Collection[str] = ()) -> list[tuple[str, str]]:
    """(field, who reads it) of each strategy or runtime option, set away from its default, swept or named in
    ``given``, that this run's strategy and runtime do not read (``--global-lr`` with ``--strategy sync``,
    ``--delay`` on ``--runtime async_sim``). The CLI refuses them, as it refuses another agent's options: the run
    would ignore them in silence."""
    defaults = TrainConfig()
    swept = dict(cfg.sweep)
    return [(field, owner) for field, owner, reads in STRATEGY_OPTIONS if not reads(cfg)
            and (getattr(cfg, field) != getattr(defaults, field) or field in swept or field in given)]


def check_torso_fits(cfg: TrainConfig, obs_shape: tuple[int, ...]) -> None:
    """Raises ConfigError if ``cfg.torso`` cannot read ``cfg.env``'s observations of ``obs_shape`` (one env's).

    The CNN torsos read frames (C, H, W); given a vector they would fail inside the first trace, after the run
    had started. The CLI calls this with the env's static spec, before any work; ``make_network`` calls it too.
    """
    if cfg.torso in CNN_TORSOS and len(obs_shape) != 3:
        _fail(f"--torso {cfg.torso} is a CNN over frames (C, H, W), but --env {cfg.env} observations have shape "
              f"{tuple(obs_shape)}: use --torso mlp (or auto)")


def check_replay_fits(cfg: TrainConfig, is_atari: bool) -> None:
    """Raises ConfigError if DQN's replay, at the capacity it will have on ``cfg.env`` (``--buffer-size``, or its
    default: 10k transitions, 1M on Atari), cannot give a minibatch or hold 8 steps of every env. ``validate`` checks
    a given ``--buffer-size``; the default depends on the env, so the CLI calls this with the env's static spec,
    before any work (a batch of 20,000 from the default 10k sampled repeats and ran), and ``make_network`` too."""
    if not cfg.is_dqn or not cfg.replay:  # without replay the buffer is sized to the batch (the lecture's ablation)
        return
    capacity = cfg.replay_capacity(is_atari)
    held = (f"--buffer-size {capacity}" if cfg.buffer_size else
            f"the replay's default capacity {capacity} (--buffer-size)")
    if cfg.batch_size > capacity:
        _fail(f"--batch-size {cfg.batch_size} is larger than {held}")
    if capacity < cfg.envs_per_worker * 8:
        _fail(f"{held} must hold at least 8 steps of --num-envs {cfg.envs_per_worker} ({8 * cfg.envs_per_worker})")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks every option and combination; raises ConfigError naming the first bad one. Creates nothing."""
    if cfg.algo not in ALGOS:
        _fail(f"--algo {cfg.algo!r} is not one of {', '.join(ALGOS)}")
    if cfg.strategy not in STRATEGIES:
        _fail(f"--strategy {cfg.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cfg.runtime not in RUNTIMES:
        _fail(f"--runtime {cfg.runtime!r} is not one of {', '.join(RUNTIMES)}")
    if cfg.torso not in TORSOS:
        _fail(f"--torso {cfg.torso!r} is not one of {', '.join(TORSOS)}")
    if cfg.critic not in CRITICS:
        _fail(f"--critic {cfg.critic!r} is not one of {', '.join(CRITICS)}")
    if cfg.anneal_lr not in ("auto", "on", "off"):
        _fail(f"--anneal-lr {cfg.anneal_lr!r} is not one of auto, on, off")
    if cfg.loss not in LOSSES:
        _fail(f"--loss {cfg.loss!r} is not one of {', '.join(LOSSES)}")
    if cfg.pipeline not in PIPELINES:
        _fail(f"--pipeline {cfg.pipeline!r} is not one of {', '.join(PIPELINES)}")
    if cfg.delay not in DELAY_KINDS:
        _fail(f"--delay {cfg.delay!r} is not one of {', '.join(DELAY_KINDS)}")
    positive_ints = {
        "--total-steps": cfg.total_steps,
        "--workers": cfg.workers,
        "--local-steps": cfg.local_steps,
        "--master-batch": cfg.master_batch,
        "--batch-size": cfg.batch_size,
        "--train-frequency": cfg.train_frequency,
        "--target-update": cfg.target_update,
        "--n-step": cfg.n_step,
        "--threads": cfg.threads,
    }
    for name, value in positive_ints.items():
        if not isinstance(value, int) or value < 1:
            _fail(f"{name} must be a positive integer, got {value}")
    non_negative_ints = {
        "--num-envs": cfg.num_envs,
        "--rollout-len": cfg.rollout_len,
        "--learning-starts": cfg.learning_starts,
        "--max-delay": cfg.max_delay,
        "--buffer-size": cfg.buffer_size,
        "--eval-episodes": cfg.eval_episodes,
    }
    for name, value in non_negative_ints.items():
        if not isinstance(value, int) or value < 0:
            _fail(f"{name} must be a non-negative integer, got {value}")
    # The compiled loop counts env steps, updates and replay slots in int32 (JAX's default integers): a larger count
    # raised an OverflowError inside the first jitted call, after --logdir was made, or would wrap around.
    for name, value in {**positive_ints, **non_negative_ints}.items():
        if value > INT32_MAX:
            _fail(f"{name} {value} is beyond {INT32_MAX} (2^31 - 1): the compiled loop counts in int32")
    if not math.isfinite(cfg.max_grad_norm) or (cfg.max_grad_norm < 0 and cfg.max_grad_norm != -1.0):
        _fail(f"--max-grad-norm must be >= 0 (or -1 for the default), got {cfg.max_grad_norm}")
    for name, value in {"--lr": cfg.learning_rate, "--ent-coef": cfg.ent_coef,
                        "--vf-coef": cfg.vf_coef}.items():
        if not math.isfinite(value) or value < 0:
            _fail(f"{name} must be a finite number >= 0, got {value}")
    if not (0.0 < cfg.gamma <= 1.0):
        _fail(f"--gamma must be in (0, 1], got {cfg.gamma}")
    if not (0.0 < cfg.tau <= 1.0):
        _fail(f"--tau must be in (0, 1], got {cfg.tau}")
    if not (0.0 < cfg.global_lr) or not math.isfinite(cfg.global_lr):
        _fail(f"--global-lr must be a positive number, got {cfg.global_lr}")
    for name, value in {"--eps-start": cfg.eps_start, "--eps-end": cfg.eps_end,
                        "--eps-fraction": cfg.eps_fraction, "--overwrite-prob": cfg.overwrite_prob,
                        "--eval-epsilon": cfg.eval_epsilon}.items():
        if not (0.0 <= value <= 1.0):
            _fail(f"{name} must be in [0, 1], got {value}")
    if not cfg.seeds:
        _fail("--seeds needs at least one seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        _fail(f"--seeds has duplicates: {list(cfg.seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in cfg.seeds):
        _fail(f"--seeds must be integers, got {list(cfg.seeds)}")  # 0.5 failed in make_xla, after --logdir was made
    if any(s < 0 for s in cfg.seeds):
        _fail(f"--seeds must be non-negative, got {list(cfg.seeds)}")
    envs_per_seed = cfg.workers * cfg.envs_per_worker
    largest_seed = (INT32_MAX + 1) // envs_per_seed - 1  # env i of worker w of seed s is seeded (s·N + w)·E + i
    if max(cfg.seeds) > largest_seed:
        _fail(f"--seeds: seed {max(cfg.seeds)} is too large: envpool seeds each env with a 31-bit integer, seed x "
              f"{envs_per_seed} envs + its index, so the largest seed of this run is {largest_seed}")
    if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) for h in cfg.hidden):
        _fail(f"--hidden sizes must be integers, got {list(cfg.hidden)}")
    if any(h < 1 for h in cfg.hidden):
        _fail(f"--hidden sizes must be positive, got {list(cfg.hidden)}")
    for name, value in {"--log-interval": cfg.log_interval, "--checkpoint-interval": cfg.checkpoint_interval}.items():
        if not value > 0:  # NaN too: every comparison with it is False, so a run never checkpointed until its end
            _fail(f"{name} must be a positive number of seconds (inf: only at the end), got {value}")

    # Sizes that must fit together.
    if cfg.is_dqn:
        if cfg.buffer_size:  # a given capacity is the env's too; the default one is checked with the env's spec
            check_replay_fits(cfg, is_atari=False)
        if cfg.learning_starts >= cfg.total_steps:
            _fail(f"--learning-starts {cfg.learning_starts} must be below --total-steps {cfg.total_steps}")
    if cfg.steps_per_iteration > cfg.total_steps:
        _fail(f"--total-steps {cfg.total_steps} is smaller than one iteration "
              f"({cfg.steps_per_iteration} steps = workers x num-envs x rollout)")

    # Strategy x runtime x workers: reject what makes no sense, with the reason.
    if cfg.strategy == "single" and cfg.workers != 1:
        _fail(f"--strategy single trains one learner; use --strategy sync/async/dpsgd for --workers {cfg.workers}")
    if cfg.strategy != "dpsgd" and cfg.local_steps != 1 and cfg.runtime != "async_sim":
        _fail(f"--local-steps {cfg.local_steps} needs --strategy dpsgd (or the async_sim runtime)")
    if cfg.master_batch > cfg.workers and cfg.runtime != "mpi":  # mpi: the job's size sets N (train.run_mpi checks)
        _fail(f"--master-batch M={cfg.master_batch} is larger than --workers N={cfg.workers}")
    if cfg.master_batch != 1 and cfg.runtime not in ("async_sim", "mpi"):
        _fail(f"--master-batch needs an asynchronous master (--runtime async_sim or mpi), not {cfg.runtime}")
    if cfg.runtime == "async_sim" and cfg.strategy not in ("async", "dpsgd"):
        _fail(f"--runtime async_sim simulates an asynchronous master: use --strategy async or dpsgd, "
              f"not {cfg.strategy}")
    if cfg.runtime == "async_sim" and cfg.strategy == "async" and cfg.local_steps != 1:
        _fail("--strategy async is Downpour SGD (one local step); use --strategy dpsgd for --local-steps > 1")
    if cfg.runtime == "distributed" and cfg.strategy != "sync":
        _fail(f"--runtime distributed is synchronous data parallelism across processes: use --strategy sync, not "
              f"{cfg.strategy} (an asynchronous master across processes is --runtime mpi)")
    given = [bool(cfg.coordinator), cfg.num_processes != 0, cfg.process_id != -1]
    if any(given) and cfg.runtime != "distributed":
        _fail("--coordinator, --num-processes and --process-id belong to --runtime distributed")
    if any(given) and not all(given):
        _fail("--coordinator, --num-processes, --process-id: give all three or none (auto-detect under srun)")
    if all(given):
        host, _, port = cfg.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _fail(f"--coordinator must be HOST:PORT, got {cfg.coordinator!r}")
        if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
            _fail(f"--process-id must be in [0, --num-processes={cfg.num_processes}), got {cfg.process_id}")
    if cfg.runtime == "mpi" and cfg.strategy not in ("sync", "async", "dpsgd"):
        _fail(f"--runtime mpi runs --strategy sync, async or dpsgd, not {cfg.strategy}")
    if cfg.runtime == "devices" and cfg.strategy == "single":
        _fail("--runtime devices lays out several workers over devices: use --strategy sync, async, dpsgd or "
              "hogwild")
    if cfg.strategy == "hogwild" and cfg.threads < 2 and cfg.overwrite_prob == 0.0:
        _fail("--strategy hogwild needs --threads >= 2 or --overwrite-prob > 0 (otherwise it is --strategy single)")
    if not math.isfinite(cfg.comm_time) or cfg.comm_time < 0:
        _fail(f"--comm-time must be a finite number >= 0, got {cfg.comm_time}")
    if len(cfg.seeds) > 1 and cfg.runtime in ("mpi", "distributed", "async_sim"):
        _fail(f"--seeds with several seeds runs as one vmapped program; --runtime {cfg.runtime} trains one run: "
              f"give one --seed per command (--runtime vmap and devices train them together)")
    _validate_sweep(cfg)
    if cfg.pipeline == "overlap" and cfg.runtime != "vmap":
        _fail(f"--pipeline overlap runs an actor thread beside the learner in one process: use --runtime vmap, "
              f"not {cfg.runtime}")
    if cfg.pipeline == "overlap" and cfg.num_iterations <= cfg.acting_only_iterations:
        needed = (cfg.acting_only_iterations + 1) * cfg.steps_per_iteration
        _fail(f"--pipeline overlap learns the data of one iteration while acting the next: --total-steps "
              f"{cfg.total_steps} leaves no update (at least {needed} needed)")
    if cfg.algo == "reinforce" and cfg.baseline not in ("value", "mean", "none"):
        _fail(f"--baseline {cfg.baseline!r} is not one of value, mean, none")
    return cfg


def _validate_sweep(cfg: TrainConfig) -> None:
    """The swept fields, their values, and every grid point as a config of its own."""
    names = [name for name, _ in cfg.sweep]
    for name, values in cfg.sweep:
        flag = SWEEPABLE.get(name)
        if flag is None:
            _fail(f"sweep: {name!r} cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
        if not values:
            _fail(f"{flag} needs at least one value")
        if len(set(values)) != len(values):
            _fail(f"{flag} has duplicates: {list(values)}")
        if name.startswith("eps_") and not cfg.is_dqn:
            _fail(f"{flag} with several values sweeps DQN's epsilon schedule; --algo {cfg.algo} has none")
        if name in ("ent_coef", "vf_coef") and cfg.is_dqn:
            _fail(f"{flag} with several values sweeps a weight of the actor-critic losses; --algo {cfg.algo} has none")
        if name == "max_delay" and cfg.strategy != "async":
            _fail(f"{flag} with several values sweeps the stale-gradient delay of --strategy async; --strategy "
                  f"{cfg.strategy} has none")
        if name == "max_delay" and cfg.delay != "fixed":
            _fail(f"{flag} with several values sweeps a fixed delay: add --delay fixed (a --delay {cfg.delay} "
                  f"distribution padded to the largest value would draw other delays than its run alone)")
    if len(set(names)) != len(names):
        _fail(f"sweep: a field is swept twice: {names}")
    if cfg.sweep and cfg.runtime in ("mpi", "distributed", "async_sim"):
        _fail(f"a sweep (several values of {', '.join(SWEEPABLE[n] for n in names)}) runs as one vmapped program; "
              f"--runtime {cfg.runtime} trains one run: give each option one value per command (--runtime vmap and "
              f"devices sweep)")
    for point in cfg.grid if cfg.sweep else ():
        validate(dataclasses.replace(cfg, sweep=(), **point))  # the ranges, and how each value fits the rest


# What --resume may change: how long the run goes on, how it reports, and where a jax.distributed job meets (each
# process has its own --process-id; a restarted job may get another coordinator). Anything else (the seeds, a sweep,
# the network, the algorithm's settings, ...) would restore a checkpoint into another program, or continue another run.
RESUMABLE_CHANGES = ("total_steps", "resume", "logdir", "log_interval", "checkpoint_interval", "eval_episodes",
                     "eval_epsilon",
                     "progress", "tensorboard", "coordinator", "process_id")
RUN_CONFIG_FILE = "config.json"  # the config of a run in --logdir, written when it starts (see check_resumable)

# Flags whose name is not --<field-name> (jaxdp.cli's option table spells every flag; tests/test_cli.py checks that
# --help shows flag_of(field) for every field).
_FLAG_OF_FIELD = {"seeds": "--seeds", "sweep": "--lr / --gamma / ... (a sweep's values)", "replay": "--no-replay",
                  "target_network": "--no-target-network", "progress": "--no-progress",
                  "tensorboard": "--no-tensorboard"}


def evaluation_shown(cfg: TrainConfig) -> str:
    """How the closing line and the progress bar name the final evaluation: "greedy eval", or "eval at ε = 0.05"."""
    return "greedy eval" if not cfg.eval_epsilon else f"eval at ε = {cfg.eval_epsilon:g}"


def point_shown(point: dict[str, float]) -> str:
    """A sweep's grid point as the options that give it: ``--lr 0.001 --gamma 0.99``."""
    return " ".join(f"{SWEEPABLE[name]} {value:g}" for name, value in point.items())


def flag_of(field: str) -> str:
    """The command-line option of a TrainConfig field."""
    return _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def check_resumable(cfg: TrainConfig, logdir: str, *, job_started: bool = True) -> None:
    """With ``cfg.resume``: raises ConfigError naming the first option that differs, outside RESUMABLE_CHANGES,
    between ``cfg`` and the run in ``logdir`` (its RUN_CONFIG_FILE; runs saved before it existed are not checked).
    An ``async_sim`` run's length is not among them: its simulated schedule is drawn for the whole run.

    The multi-process runtimes (mpi, distributed) ignore ``--workers``: the job's size decides it, and they save
    that number. Their ``workers`` is compared only once the job has started (``cfg.workers`` is then its size);
    the command line, which checks before, passes ``job_started=False``.
    """
    import json
    import os

    path = os.path.join(logdir, RUN_CONFIG_FILE)
    if not cfg.resume or not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    sized_by_job = cfg.runtime in ("mpi", "distributed")
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples become lists, as in the saved file
    for field, value in now.items():
        if field not in saved or saved[field] == value:
            continue
        if field == "total_steps" and cfg.runtime == "async_sim":
            _fail(f"--resume: --total-steps is {value} here but {saved[field]} in the run being resumed; --runtime "
                  f"async_sim draws its schedule (and anneals the learning rate) for the whole run, so its length "
                  f"cannot change")
        if field in RESUMABLE_CHANGES:
            continue
        if field == "workers" and sized_by_job:
            if not job_started:
                continue
            _fail(f"--resume: the run being resumed had {saved['workers']} workers, this job has {value}: "
                  f"start it with the same number of processes")
        changeable = [f for f in RESUMABLE_CHANGES if f not in ("resume", "logdir")
                      and not (f == "total_steps" and cfg.runtime == "async_sim")]
        if field == "sweep":
            _fail(f"--resume: the run being resumed swept {_sweep_shown(saved[field])}, this command sweeps "
                  f"{_sweep_shown(value)}; a sweep's values cannot change")
        _fail(f"--resume: {flag_of(field)} is {value!r} here but {saved[field]!r} in the run being resumed; only "
              f"{', '.join(flag_of(f) for f in changeable)} may change")


def _sweep_shown(sweep: list) -> str:
    """A sweep as its options, ``--lr 0.001 0.002 --gamma 0.9 0.99``, or ``nothing``."""
    return " ".join(f"{SWEEPABLE.get(name, name)} {' '.join(f'{v:g}' for v in values)}"
                    for name, values in sweep) or "nothing"


# What a resumed command line takes from its own invocation, never from the run it continues: the resume and its
# folder, where and as what this process meets a jax.distributed job, and the progress bar and TensorBoard, whose
# flags (--no-progress, --no-tensorboard) can only turn them off: inherited, a resume could never turn them back on.
INVOCATION_FIELDS = ("resume", "logdir", "progress", "tensorboard", "coordinator", "num_processes", "process_id")


def resumed_config(cfg: TrainConfig, given: Collection[str], logdir: str) -> TrainConfig:
    """``--resume``: the run's saved config (``logdir``'s RUN_CONFIG_FILE) with the fields this command line gave
    (``given``: field names, values from ``cfg``) put over it, so that ``jaxdp train --resume --logdir DIR`` continues a
    run as it was, to the end it had. A given field that differs from the run's is then refused by
    :func:`check_resumable` unless it may change. Each swept field's values come from where its own value does. Without
    a saved config (a run from before it existed), ``cfg`` as it is."""
    import json
    import os

    path = os.path.join(logdir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        return cfg
    with open(path) as f:
        saved = json.load(f)

    def as_tuples(value):  # JSON has lists where the config has tuples (seeds, hidden, sweep)
        return tuple(map(as_tuples, value)) if isinstance(value, list) else value

    names = {field.name for field in dataclasses.fields(TrainConfig)}
    kept = {name: as_tuples(value) for name, value in saved.items()
            if name in names and name not in given and name not in INVOCATION_FIELDS and name != "sweep"}
    saved_sweep, given_sweep = dict(as_tuples(saved.get("sweep", []))), dict(cfg.sweep)
    sweep = tuple((name, values) for name in SWEEPABLE
                  for values in [given_sweep.get(name) if name in given else saved_sweep.get(name)] if values)
    return dataclasses.replace(cfg, **kept, sweep=sweep)


def save_run_config(cfg: TrainConfig, logdir: str) -> None:
    """Writes ``cfg`` to ``logdir``'s RUN_CONFIG_FILE (atomically), what a later ``--resume`` must match; a resumed
    run is checked against the file first (:func:`check_resumable`). The multi-process runtimes pass ``cfg`` with
    ``workers`` set to the job's size."""
    import os

    from jaxdp import atomic

    check_resumable(cfg, logdir)
    make_logdir(logdir)
    atomic.write_json(os.path.join(logdir, RUN_CONFIG_FILE), dataclasses.asdict(cfg))


def make_logdir(logdir: str) -> None:
    """Creates ``logdir`` (and its parents) if need be; a folder that cannot be made is a ConfigError of one line."""
    import os

    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as error:  # what no check can foresee (a read-only or virtual filesystem): still one line
        raise ConfigError(f"--logdir {logdir!r} cannot be created: {error.strerror}") from None


def atari_dqn_defaults(algo: str, is_atari: bool, given: dict) -> dict:
    """The DQN options of ``ATARI_DQN_DEFAULTS`` not in ``given``, when ``algo`` is a DQN on an Atari game; else {}."""
    if algo not in ("dqn", "double_dqn") or not is_atari:
        return {}
    return {k: v for k, v in ATARI_DQN_DEFAULTS.items() if given.get(k) is None}


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    return dataclasses.replace(cfg, **kw)

