"""The ``jaxdp`` command line.

``jaxdp train ...`` parses every option into a :class:`jaxdp.config.TrainConfig`, validates all of it (and the
environment id) before any work starts, and only then imports JAX and trains. A bad option or value prints one
line naming it and exits with status 2; no log directory is created.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from jaxdp import config as config_lib
from jaxdp.cli_args import OneLineParser as _OneLineParser
from jaxdp.cli_args import folder_problem, given_options, integer

EXIT_USAGE = 2


_D = config_lib.TrainConfig()

# (flag, field, type, help). One table so that --help documents every option with its default.
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--algo", "algo", str, f"agent: {', '.join(config_lib.ALGOS)}"),
    ("--env", "env", str, "environment id: envpool (Pong-v5, Breakout-v5, CartPole-v1, Acrobot-v1, ...) "
                          "or gymnasium"),
    ("--total-steps", "total_steps", int, "environment steps per seed, all workers and envs together; rounded "
                                          "down to whole iterations (A2C: envs x rollout length), up to whole "
                                          "chunks on --runtime async_sim"),
    ("--num-envs", "num_envs", int, "environments per worker (0 = algorithm default: dqn 4, a2c 16, reinforce 8)"),
    ("--optimizer", "optimizer", str, "inner optimizer: adam, rmsprop or sgd"),
    ("--lr", "lr", float, "learning rate (0 is a rate of 0: a control that does not learn)"),
    ("--anneal-lr", "anneal_lr", str, "linear learning-rate decay to 0: auto (on for a2c/reinforce, off for dqn), "
                                      "on, off"),
    ("--max-grad-norm", "max_grad_norm", float, "clip gradients to this global norm (0 = off, -1 = algorithm "
                                                "default: a2c/reinforce 0.5, dqn 10)"),
    ("--gamma", "gamma", float, "discount factor"),
    ("--torso", "torso", str, "network torso: auto (mlp for vectors, nature for Atari), mlp, nature, a3c"),
    ("--layer-norm", "layer_norm", "flag", "LayerNorm after each hidden layer"),
    ("--critic", "critic", str, "A2C/REINFORCE value network: shared (one torso under both heads) or separate "
                                "(a torso of its own; Acrobot-v1 needs it)"),
    ("--buffer-size", "buffer_size", int, "DQN replay capacity in transitions (0 = 10k for vector observations, "
                                          "1M for Atari)"),
    ("--batch-size", "batch_size", int, "DQN minibatch size"),
    ("--learning-starts", "learning_starts", int, "DQN: env steps of random play before learning"),
    ("--train-frequency", "train_frequency", int, "DQN: env steps (all envs) per gradient update, "
                                                  "rounded to whole steps of the env pool (10 with 4 envs: 8)"),
    ("--target-update", "target_update", int, "DQN: env steps between hard target-network copies"),
    ("--tau", "tau", float, "DQN: Polyak rate of the target network per update (1 = hard copies)"),
    ("--eps-start", "eps_start", float, "DQN: initial epsilon"),
    ("--eps-end", "eps_end", float, "DQN: final epsilon"),
    ("--eps-fraction", "eps_fraction", float, "DQN: fraction of --total-steps over which epsilon decays"),
    ("--n-step", "n_step", int, "DQN: n-step returns"),
    ("--loss", "loss", str, "DQN TD loss: auto (huber for Atari, mse otherwise), mse or huber"),
    ("--no-replay", "replay", "noflag", "DQN ablation: learn from the latest transitions only"),
    ("--no-target-network", "target_network", "noflag", "DQN ablation: bootstrap from the online network"),
    ("--rollout-len", "rollout_len", int, "A2C n-step / REINFORCE rollout length (0 = default: 8 / 500)"),
    ("--ent-coef", "ent_coef", float, "A2C/REINFORCE entropy bonus"),
    ("--vf-coef", "vf_coef", float, "A2C/REINFORCE value-loss coefficient"),
    ("--baseline", "baseline", str, "REINFORCE baseline: mean (the batch's mean return), value (a learned V(s), "
                                    "weighted by --vf-coef) or none"),
    ("--pipeline", "pipeline", str, "fused: act, then learn, in one program; overlap: an actor thread acts "
                                    "with parameters one update old while the learner updates (Cleanba's "
                                    "schedule; --runtime vmap)"),
    ("--strategy", "strategy", str, f"how workers cooperate: {', '.join(config_lib.STRATEGIES)}"),
    ("--runtime", "runtime", str, f"where workers run: {', '.join(config_lib.RUNTIMES)}"),
    ("--workers", "workers", int, "number of workers N"),
    ("--local-steps", "local_steps", int, "DPSGD: local steps B between pushes"),
    ("--master-batch", "master_batch", int, "DPSGD: update vectors M aggregated per master update"),
    ("--global-lr", "global_lr", float, "dpsgd, and async on async_sim / mpi: the master's step size on the arrivals"),
    ("--delay", "delay", str, "async on vmap / devices: delay distribution: fixed, uniform, geometric, zipf"),
    ("--max-delay", "max_delay", int, "async on vmap / devices: largest gradient delay in steps"),
    ("--threads", "threads", int, "hogwild: lock-free threads per worker"),
    ("--comm-time", "comm_time", float, "async_sim: one-way message time, in env steps of one env"),
    ("--overwrite-prob", "overwrite_prob", float, "hogwild: probability that a coordinate's write is lost"),
    ("--coordinator", "coordinator", str, "distributed: HOST:PORT of process 0 (with --num-processes and "
                                          "--process-id; empty = auto-detect under srun)"),
    ("--num-processes", "num_processes", int, "distributed: processes in the job (0 = auto-detect)"),
    ("--process-id", "process_id", int, "distributed: this process's index (-1 = auto-detect)"),
    ("--logdir", "logdir", str, "output directory (metrics.jsonl, summary.json, TensorBoard, checkpoints); "
                                "empty = runs/<algo>_<env>_<strategy>_<time>"),
    ("--log-interval", "log_interval", float, "seconds between log points"),
    ("--checkpoint-interval", "checkpoint_interval", float, "seconds between checkpoints, or more after a slow "
                                                            "save: saving takes at most 5%% of the run (an Atari DQN "
                                                            "replay: about 3 s a save)"),
    ("--resume", "resume", "flag",
     "continue from the latest checkpoint in --logdir; the options not given are the run's (its config.json)"),
    ("--eval-episodes", "eval_episodes", int,
     "evaluation episodes at the end, greedy unless --eval-epsilon (0 = none)"),
    ("--eval-epsilon", "eval_epsilon", float, "probability of a uniformly random action in the evaluation episodes "
                                              "(0 = greedy; 0.05 is the Nature-DQN protocol, under which a Breakout "
                                              "policy that never presses FIRE still ends its games)"),
    ("--no-progress", "progress", "noflag", "no progress bar"),
    ("--no-tensorboard", "tensorboard", "noflag", "no TensorBoard events"),
]


_FLAG_OF = {field: flag for flag, field, _, _ in _OPTIONS}
# Every destination of `jaxdp train`'s options: those of _OPTIONS, --hidden and the three seed options.
_TRAIN_DESTS = (*_FLAG_OF, "hidden", "seed", "seeds", "num_seeds")


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train an agent",
        description="Train an RL agent, alone or as N workers cooperating by a distributed-SGD strategy. Several "
                    "--seeds, and several values of " + ", ".join(config_lib.SWEEPABLE.values()) + ", train every "
                    "combination at once, as one vmapped program.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flag, field, kind, help_text in _OPTIONS:
        default = getattr(_D, field)
        kind = integer if kind is int else kind  # --total-steps 1e6
        if field in config_lib.SWEEPABLE:
            # Several values sweep the option: every combination, with every seed, as one vmapped program.
            atari = config_lib.ATARI_DQN_DEFAULTS.get(field)
            shown = default if atari is None else f"{atari} on Atari DQN, else {default}"
            if field == "lr":  # None: the algorithm's
                shown = "dqn 2.5e-4 (1e-4 on Atari), a2c/reinforce 2e-3"  # TrainConfig.learning_rate
            p.add_argument(flag, dest=field, type=kind, nargs="+", default=None,
                           help=f"{help_text}; several values sweep it (default: {shown})%(default).0s")
        elif kind in ("flag", "noflag"):
            # A flag is off until given; "(default: True)" beside --no-replay would read as the ablation being on.
            action = "store_true" if kind == "flag" else "store_false"
            p.add_argument(flag, dest=field, action=action, help=f"{help_text}%(default).0s")
        elif field == "workers":
            # Unset (None) until known: under mpi and distributed the job's size decides, and a --workers given must
            # match it (_check_job_size).
            p.add_argument(flag, dest=field, type=kind, default=None,
                           help=f"{help_text} (default: {default}; --runtime mpi / distributed: the job's "
                                f"size)%(default).0s")
        elif field in config_lib.ATARI_DQN_DEFAULTS:
            # Unset (None) until the env is known: Atari DQN takes the Nature-DQN value (config_from_args).
            atari = config_lib.ATARI_DQN_DEFAULTS[field]
            p.add_argument(flag, dest=field, type=kind, default=None,
                           help=f"{help_text} (default: {default}; DQN on Atari: {atari})%(default).0s")
        else:
            # An empty default means "decided at run time", which the help text says; "(default: )" would not.
            p.add_argument(flag, dest=field, type=kind, default=default,
                           help=help_text + ("%(default).0s" if default == "" else ""))
    p.add_argument("--hidden", type=integer, nargs="+", default=list(_D.hidden), help="MLP hidden sizes")
    seeds = p.add_mutually_exclusive_group()
    # Unset (None) until config_from_args picks the one given; %(default).0s keeps "(default: None)" out of --help.
    seeds.add_argument("--seed", type=integer, default=None, help="one seed (default: 0)%(default).0s")
    seeds.add_argument("--seeds", type=integer, nargs="+", default=None,
                       help="several seeds trained as one vmapped program%(default).0s")
    seeds.add_argument("--num-seeds", type=integer, default=None,
                       help="seeds 0..S-1 as one vmapped program%(default).0s")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxdp`` parser."""
    return _build_parser()[0]


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``jaxdp`` parser and its ``train`` subparser."""
    parser = _OneLineParser(
        prog="jaxdp",
        description="jaxdp: distributed and parallel SGD as optax transforms, and the deep RL trained with it. "
                    "'DPSGD' here is Distributed-Parallel SGD (Mohamad et al.), not differentially-private SGD.",
    )
    parser.add_argument("--version", action=_PrintVersion,
                        help="the versions of jaxdp and of the libraries behind its numbers, and the machine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    return parser, _train_parser(sub)


def given_fields(argv: Sequence[str] | None) -> frozenset[str]:
    """The fields of the ``jaxdp train`` options that ``argv`` gives, whatever their values. An option the run does
    not read is refused when given, even at its default value (``--algo a2c --baseline mean``): a comparison with
    the default cannot tell that it was given."""
    parser, train = _build_parser()
    return given_options(parser, _TRAIN_DESTS, argv, holder=train)


class _PrintVersion(argparse.Action):
    """``--version``: prints :func:`_version_text` as it is (argparse's own action rewraps it into a paragraph)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(_version_text())
        parser.exit()


def _version_text() -> str:
    """``jaxdp 0.1.0`` and one line per library and for the machine, as each summary.json records them."""
    from jaxdp import provenance

    found = provenance.versions()
    host = provenance.machine()
    lines = [f"jaxdp {found.pop('jaxdp')}"] + [f"  {name} {version or 'not installed'}"
                                                for name, version in found.items()]
    return "\n".join(lines + [f"  machine: {host['os']}, {host['cpu']}, {host['cores']} cores"])


def config_from_args(args: argparse.Namespace) -> config_lib.TrainConfig:
    fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    # Options left unset get the Atari-DQN value for a DQN on an Atari game, else the dataclass default.
    algo = kw.get("algo", _D.algo)
    is_atari = False
    if algo in ("dqn", "double_dqn"):
        from jaxdp.envs import backend_of, validate_env_id
        from jaxdp.envs.spec import _is_atari

        env = kw.get("env", _D.env)
        validate_env_id(env)
        is_atari = backend_of(env) == "envpool" and _is_atari(env)
    kw.update(config_lib.atari_dqn_defaults(algo, is_atari, kw))
    kw = {k: v for k, v in kw.items() if v is not None}
    # A sweepable option given several values becomes a sweep; its own field keeps the first (unused) value.
    sweep = []
    for field in config_lib.SWEEPABLE:
        values = kw.get(field)
        if isinstance(values, list):
            kw[field] = values[0]
            if len(values) > 1:
                sweep.append((field, tuple(values)))
    kw["sweep"] = tuple(sweep)
    kw["hidden"] = tuple(args.hidden)
    kw.pop("seeds", None)  # --seed / --seeds / --num-seeds are folded into one tuple below
    if args.seeds is not None:
        kw["seeds"] = tuple(args.seeds)
    elif args.num_seeds is not None:
        if args.num_seeds < 1:
            raise config_lib.ConfigError(f"--num-seeds must be a positive integer, got {args.num_seeds}")
        kw["seeds"] = tuple(range(args.num_seeds))
    elif args.seed is not None:
        kw["seeds"] = (args.seed,)
    return config_lib.TrainConfig(**kw)


# What mpirun (Open MPI, MPICH / Intel MPI's hydra) and srun set in each process they start.
_LAUNCHER_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_LAUNCHER_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def _from_launcher(names: Sequence[str]) -> int | None:
    import os

    return next((int(os.environ[name]) for name in names if os.environ.get(name, "").isdigit()), None)


def _launcher_rank() -> int:
    """This process's rank as mpirun (or srun) numbers it, from the environment (0 when not launched by one)."""
    rank = _from_launcher(_LAUNCHER_RANK)
    return 0 if rank is None else rank


def _launcher_size() -> int | None:
    """How many processes mpirun (or srun) started, from the environment: 1 when none started this one (a process
    run alone is a job of one), None when one did without saying how many."""
    return 1 if _from_launcher(_LAUNCHER_RANK) is None else _from_launcher(_LAUNCHER_SIZE)


def _check_job_size(args: argparse.Namespace, cfg: config_lib.TrainConfig) -> None:
    """``--workers``, where given to a job whose size sets the workers (``--runtime mpi`` / ``distributed``), must be
    what the job has: a run forgotten outside mpirun is a job of one process, and would train one worker, not N."""
    if args.workers is None or cfg.runtime not in ("mpi", "distributed"):
        return
    if cfg.runtime == "mpi":
        servers = 0 if cfg.strategy == "sync" else 1  # async and dpsgd: rank 0 is the parameter server
        size = _launcher_size()
        if size is not None and size != cfg.workers + servers:
            role = "" if not servers else " (rank 0 serves the parameters)"
            raise config_lib.ConfigError(
                f"--runtime mpi --strategy {cfg.strategy} --workers {cfg.workers} needs {cfg.workers + servers} MPI "
                f"processes{role}, this job has {size}: start it with mpirun -n {cfg.workers + servers}, or leave "
                f"--workers out (the job's size decides)")
    else:
        # Without --num-processes, srun's size; a process run alone finds no cluster to join (run_distributed).
        size = cfg.num_processes or _from_launcher(_LAUNCHER_SIZE)
        if size is not None and size != cfg.workers:
            raise config_lib.ConfigError(
                f"--runtime distributed --workers {cfg.workers}: the job has {size} process{'es' * (size != 1)}, one "
                f"worker each; leave --workers out (the job's size decides)")


# Before MPI starts, the launcher ends the whole job as soon as one rank exits non-zero, and a rank it ends has its
# output dropped: the other ranks give rank 0 this long to print its line and exit first.
REPORT_GRACE_SECONDS = 5.0


def _report(error: Exception, *, job_started: bool = False) -> int:
    """Prints the one line for bad input and returns exit status 2. Under mpirun (or srun) every rank parses the
    same command line and finds the same problem, and all of them exit 2; only rank 0 prints it. Before the job has
    started (MPI, jax.distributed), the other ranks wait ``REPORT_GRACE_SECONDS`` first: a rank that exited at
    once could have the launcher end rank 0 before its line is out (seen under ``mpirun --with-ft ulfm``)."""
    if _launcher_rank() == 0:
        sys.stderr.write(f"jaxdp train: error: {error}\n")
        sys.stderr.flush()
    elif not job_started:
        import time

        time.sleep(REPORT_GRACE_SECONDS)  # rank 0's exit ends this process first, as a rule
    return EXIT_USAGE


def resolve_logdir(cfg: config_lib.TrainConfig) -> config_lib.TrainConfig:
    """Picks a fresh run directory, or checks the given one: never overwrite a run, never resume from nothing."""
    import os
    import time

    logdir = cfg.logdir
    if cfg.resume and not logdir:  # a fresh runs/<...>_<time> name never holds a checkpoint
        raise config_lib.ConfigError("--resume needs --logdir, the folder of the run to continue")
    if not logdir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        env = cfg.env.replace("/", "_")
        logdir = os.path.join("runs", f"{cfg.algo}_{env}_{cfg.strategy}_{stamp}")
    # Every process of a multi-process job makes these checks and finds the same answer, so all of them stop here,
    # before MPI or jax.distributed starts (one that went on would wait forever for the others). None can see
    # another's outputs yet: process 0 writes only after MPI's start-up barrier (jaxdp.train.run_mpi) or
    # jax.distributed.initialize, which wait for every process to get there.
    problem = folder_problem(logdir, "--logdir")  # a run must not fail at its first write, after work has started
    if problem:
        raise config_lib.ConfigError(problem)
    has_run = os.path.exists(os.path.join(logdir, "metrics.jsonl")) or os.path.isdir(
        os.path.join(logdir, "checkpoints"))
    ckpt_dir = os.path.join(logdir, "checkpoints")
    saved = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if os.path.exists(os.path.join(logdir, "checkpoint.npz")):  # the mpi and distributed runtimes' checkpoint
        saved.append("checkpoint.npz")
    if cfg.resume and not saved:  # a run killed before its first save leaves an empty checkpoints/ behind
        raise config_lib.ConfigError(f"--resume: no checkpoints in --logdir {logdir!r}")
    if has_run and not cfg.resume:
        raise config_lib.ConfigError(f"--logdir {logdir!r} already holds a run: pass --resume to continue it "
                                     f"or choose another --logdir")
    config_lib.check_resumable(cfg, logdir, job_started=False)
    return dataclasses.replace(cfg, logdir=logdir)


def _check_dqn_options(cfg: config_lib.TrainConfig, given: frozenset[str]) -> None:
    """DQN's replay and target-network options that this run would ignore, refused as options its agent does not
    read are."""
    if not cfg.is_dqn:
        return
    flags = [_FLAG_OF[field] for field in ("target_update", "tau") if field in given]
    if flags and not cfg.target_network:
        raise config_lib.ConfigError(f"{flags[0]} sets the target network, which --no-target-network turns off")
    if "buffer_size" in given and not cfg.replay:
        raise config_lib.ConfigError(f"--buffer-size {cfg.buffer_size} sizes the replay, which --no-replay turns off "
                                     f"(the latest steps of each env are kept, at least --batch-size)")
    if "target_update" in given and cfg.tau != 1.0:  # --tau 1 is hard copies, every --target-update steps
        # CleanRL and SB3 average every target_network_frequency steps; a user of theirs would get another target.
        raise config_lib.ConfigError(f"--target-update {cfg.target_update} is the period of hard target copies; "
                                     f"with --tau {cfg.tau:g} the target moves toward the online network after "
                                     f"every update instead (CleanRL and SB3 average every --target-update steps): "
                                     f"give one of the two")


def _check_baseline_options(cfg: config_lib.TrainConfig, given: frozenset[str]) -> None:
    """REINFORCE's --vf-coef weighs the loss of its learned value baseline, and --critic shapes its network: with
    --baseline mean or none there is no such loss, and the run would ignore the option, as an agent ignores another
    agent's options (refused too)."""
    if cfg.algo != "reinforce" or cfg.baseline == "value":
        return
    if "critic" in given:
        raise config_lib.ConfigError(f"--critic {cfg.critic} shapes REINFORCE's learned value baseline; --baseline "
                                     f"{cfg.baseline} learns none (use --baseline value)")
    if "vf_coef" in given:  # a swept --vf-coef was given too
        raise config_lib.ConfigError(f"--vf-coef weighs the loss of REINFORCE's learned value baseline; --baseline "
                                     f"{cfg.baseline} learns none (use --baseline value)")


def check_devices(workers: int) -> None:
    """``--runtime devices`` puts one worker on each device: make sure N exist, before any work.

    On CPU, JAX offers N host devices when ``--xla_force_host_platform_device_count=N`` is in XLA_FLAGS before its
    backend starts; set it here (unless the user chose a count) so that ``--runtime devices --workers N`` runs on a
    laptop as it does on N accelerators. The flag only affects the CPU platform.
    """
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={workers}".strip()
    import jax

    devices = jax.devices()
    if len(devices) < workers:
        raise config_lib.ConfigError(
            f"--runtime devices --workers {workers} needs {workers} devices, found {len(devices)} "
            f"{devices[0].platform} device(s); lower --workers or use --runtime vmap")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
    except KeyboardInterrupt:  # a second Ctrl-C, which acts at once (a first one stops the run with a checkpoint)
        sys.stderr.write("jaxdp: interrupted at once; --resume continues from the run's last checkpoint, if any\n")
        status = 130
    mpi_runtime = sys.modules.get("jaxdp.runtime.mpi")
    if mpi_runtime is not None:  # --runtime mpi: end MPI within a bounded time, keeping this exit status
        mpi_runtime.finalize(status)
    return status


def _checked_config(args: argparse.Namespace, argv: Sequence[str] | None) -> config_lib.TrainConfig:
    """The run's config from the parsed command line, with every check that needs no training code: a bad value, an
    option the run does not read, an env jaxdp cannot play, a replay that cannot fit, a --logdir that cannot be
    written or a --resume of another run raise ConfigError (or ValueError), before anything is written."""
    cfg = config_from_args(args)
    given = given_fields(argv)
    if args.resume and args.logdir:  # the run as it was: what this command line does not give is the run's
        seeds_given = given & {"seed", "seeds", "num_seeds"}
        cfg = config_lib.resumed_config(cfg, (given - seeds_given) | ({"seeds"} if seeds_given else set()),
                                        args.logdir)
    cfg = config_lib.validate(cfg)
    for field, owner in config_lib.options_not_read(cfg, given):
        raise config_lib.ConfigError(f"{_FLAG_OF[field]} is for {owner} only: --algo {cfg.algo} does not read it")
    for field, owner in config_lib.strategy_options_not_read(cfg, given):
        raise config_lib.ConfigError(f"{_FLAG_OF[field]} is for {owner}; --strategy {cfg.strategy} on --runtime "
                                     f"{cfg.runtime} does not read it")
    _check_dqn_options(cfg, given)
    _check_baseline_options(cfg, given)
    _check_job_size(args, cfg)
    from jaxdp.envs import backend_of, make_spec  # the registries and envpool's static spec: no environment

    if backend_of(cfg.env) != "envpool":  # raises on an unknown id
        raise config_lib.ConfigError(f"--env {cfg.env!r} is a gymnasium-only id: jaxdp train steps envpool "
                                     f"environments inside the compiled loop (use an envpool id)")
    # make_spec also refuses continuous actions.
    spec = make_spec(cfg.env, 1)
    config_lib.check_torso_fits(cfg, spec.obs_shape)
    config_lib.check_replay_fits(cfg, spec.is_atari)
    torso = cfg.torso_for(spec.is_atari)  # as make_network builds it
    if torso in config_lib.CNN_TORSOS and "hidden" in given:
        raise config_lib.ConfigError(f"--hidden sets the MLP torso's widths; this run's torso is the {torso} CNN "
                                     f"(--torso {cfg.torso} on {cfg.env}), which does not read it")
    if cfg.runtime == "devices":
        check_devices(cfg.workers)
    # The replays must fit the memory left. Asking the device starts JAX's backend, which jax.distributed must
    # start itself: such a job checks once it has (jaxdp.train.run_distributed).
    if cfg.is_dqn and cfg.runtime != "distributed":
        from jaxdp.train import check_replay_memory

        check_replay_memory(cfg, spec)
    cfg = resolve_logdir(cfg)
    return cfg


def _main(argv: Sequence[str] | None) -> int:
    from jaxdp.stopping import RunStopped, WriteFailed, exit_status, stop_requests

    # Until the run's own loop takes the signals over (jaxdp.loop.run enters its handlers first thing): a signal while
    # the command line is checked and JAX loads ends the command in one line, not in a traceback, nor in a
    # KeyboardInterrupt that a callback swallowed while the run went on to its end.
    with stop_requests() as early:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        try:
            cfg = _checked_config(args, argv)
        except (config_lib.ConfigError, ValueError) as e:
            return _report(e)
        from jaxdp import train as train_lib  # JAX is imported only once the input is known to be good
        from jaxdp.runtime.mpi import WorkersLost  # starts no MPI: mpi4py is imported when a run_mpi starts it
    if early:
        return exit_status(RunStopped(early[0], 0, cfg.total_steps, cfg.logdir if cfg.resume else None,
                                      report=_launcher_rank() == 0, starting=True), "jaxdp train")

    notice = _rounding_notice(cfg)
    if notice and _launcher_rank() == 0:
        sys.stderr.write(f"jaxdp train: {notice}\n")
    try:
        summary = train_lib.run(cfg)
    except config_lib.ConfigError as e:  # what only a started multi-process job knows: its size, on --resume
        return _report(e, job_started=True)
    except RunStopped as stop:  # a signal: the run logged and saved a checkpoint, then stopped
        return exit_status(stop, "jaxdp train")
    except WriteFailed as failed:  # a full or read-only disk: the run stopped, its last checkpoint whole
        if failed.report:  # process 0 speaks for a multi-process job
            sys.stderr.write(f"jaxdp train: {failed}\n")
        return 1
    except WorkersLost as lost:  # the parameter server of --runtime mpi, alone: it saved a checkpoint where it stopped
        sys.stderr.write(f"jaxdp train: {lost}; --resume continues from its checkpoint\n")
        return 1
    if summary is None:  # a non-zero MPI rank: rank 0 reports
        return 0
    evaluated = config_lib.evaluation_shown(cfg)
    if cfg.sweep:
        print(f"jaxdp train: {len(cfg.runs)} runs ({len(cfg.grid)} points x {len(cfg.seeds)} "
              f"seed{'s' if len(cfg.seeds) > 1 else ''}) of "
              f"{_steps(summary)} in {_seconds(summary)}; outputs in {cfg.logdir}")
        for point in summary["grid"]:
            label = config_lib.point_shown(point["hyperparams"])
            mark = "  (best)" if point["hyperparams"] == summary["best"] else ""
            print(f"  {label}: {_returns(point, evaluated, 'final_return_over_seeds', 'eval_return_over_seeds')}{mark}")
        if len(cfg.seeds) > 1:
            print(f"  (mean ± std over {len(cfg.seeds)} seeds; 95% confidence intervals in summary.json)")
    elif len(cfg.seeds) > 1:
        print(f"jaxdp train: {len(cfg.seeds)} seeds of {_steps(summary)} in "
              f"{_seconds(summary)}; outputs in {cfg.logdir}")
        over_seeds = _returns(summary, evaluated, "final_return_over_seeds", "eval_return_over_seeds")
        print(f"  mean ± std over seeds: {over_seeds} (95% confidence intervals in summary.json)")
        for run in summary["seeds"]:
            print(f"  seed {run['seed']}: {_returns(run, evaluated)}")
    else:
        print(f"jaxdp train: {_steps(summary)} in {_seconds(summary)}; "
              f"{_returns(summary, evaluated)}; outputs in {cfg.logdir}")
    for note in (_diverged_runs(cfg, summary), _unfinished_evaluation(cfg, summary)):
        if note:
            print(f"  {note}")
    return 0


def _diverged_runs(cfg: config_lib.TrainConfig, summary: dict) -> str | None:
    """A note naming the runs whose loss became NaN or infinite, or whose final parameters are not finite: such a
    run trains on to its end, and its returns would otherwise read as a poor agent's."""
    from jaxdp.loop import diverged

    runs = summary.get("runs") or summary.get("seeds") or [summary]
    bad = [run for run in runs if diverged(run)]
    if not bad:
        return None

    def how(run: dict) -> str:
        step = run.get("diverged_at_step")
        return f"loss NaN or infinite from step {step}" if step is not None else "final parameters not finite"

    hint = "a lower --lr" + (" or --max-grad-norm" if cfg.max_grad_norm == 0 else "")
    if len(runs) == 1:
        return f"the run diverged ({how(bad[0])}): its returns are a broken policy's; try {hint}"
    named = [f"{config_lib.point_shown(run['hyperparams']) + ' ' if 'hyperparams' in run else ''}seed {run['seed']}: "
             f"{how(run)}" for run in bad]
    shown = "; ".join(named[:4]) + (f"; and {len(named) - 4} more" if len(named) > 4 else "")
    return f"{len(bad)} of {len(runs)} runs diverged ({shown}); try {hint}"


def _rounding_notice(cfg: config_lib.TrainConfig) -> str | None:
    """A note before training when whole iterations leave out more than 1% of ``--total-steps`` (vmap and devices,
    which train ``cfg.num_iterations`` whole iterations): REINFORCE's 500-step rollouts of 3 workers x 8 envs turn
    20,000 steps into 12,000, which the closing line alone told, once the run was over."""
    if cfg.runtime not in ("vmap", "devices"):
        return None
    trained, per_iteration = cfg.num_iterations * cfg.steps_per_iteration, cfg.steps_per_iteration
    if trained >= 0.99 * cfg.total_steps:
        return None
    return (f"--total-steps {cfg.total_steps} trains {trained} steps, {cfg.num_iterations} whole iteration"
            f"{'s' if cfg.num_iterations > 1 else ''} of {per_iteration} (workers x num-envs x "
            f"{'env steps per update' if cfg.is_dqn else 'rollout'}); a multiple of {per_iteration} trains them all")


def _unfinished_evaluation(cfg: config_lib.TrainConfig, summary: dict) -> str | None:
    """A note when some evaluation games did not end within their time limit: the evaluation's return is the mean
    of those that did (or n/a), and a greedy policy that stalls (Breakout without FIRE) plays each to the limit."""
    ended, asked = summary.get("eval_episodes_ended"), cfg.eval_episodes * len(cfg.runs)
    if ended is None or ended >= asked:
        return None
    mean = "; the evaluation's return is their mean" if ended else ""
    hint = "" if cfg.eval_epsilon else "; a greedy policy can stall a game: --eval-epsilon 0.05 plays ε-greedy games"
    return f"{ended} of the {asked} evaluation games ended within their time limit{mean}{hint}"


def _steps(summary: dict) -> str:
    """"N steps", and where a --resume began ("N steps (resumed at step M)"): the seconds that follow are its own."""
    start = summary.get("start_step") or 0
    return f"{summary.get('total_steps')} steps" + (f" (resumed at step {start})" if start else "")


def _seconds(summary: dict) -> str:
    """The training's seconds, what they hold, and the evaluation's apart. A single-process run's clock
    includes its compilation; a multi-process job's ranks compile before theirs starts, and their start-up is
    counted apart: said either way, so that runtimes are not compared on different clocks."""
    text = f"{summary.get('wall_seconds', 0.0):.1f} s"
    notes = []
    if summary.get("startup_seconds") is not None:
        text += f" after {summary['startup_seconds']:.1f} s of start-up and compilation"
    elif summary.get("compile_seconds") is not None:
        notes.append(f"{summary['compile_seconds']:.1f} s of it compiling")
    if (summary.get("eval_seconds") or 0.0) >= 0.05:
        notes.append(f"then {summary['eval_seconds']:.1f} s of evaluation")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _returns(record: dict, evaluated: str, final_over_seeds: str = "", eval_over_seeds: str = "") -> str:
    """"final return R, greedy eval E" of a run (``evaluated`` names the evaluation), or of several seeds as
    "mean ± std" where ``record`` holds their statistics (under the two keys given) over more than one seed."""
    def one(value_key: str, stats_key: str) -> str:
        stats = record.get(stats_key) if stats_key else None
        if stats and stats.get("n", 0) > 1:
            return f"{_rounded(stats['mean'])} ± {_rounded(stats['std'])}"
        return str(_rounded(record.get(value_key)))

    return (f"final return {one('final_return', final_over_seeds)}, "
            f"{evaluated} {one('eval_return', eval_over_seeds)}")


def _rounded(value: float | None) -> float | str:
    """A return for the closing line: one decimal, or "n/a" where no episode ended (or none was played)."""
    return "n/a" if value is None else round(value, 1)


if __name__ == "__main__":
    raise SystemExit(main())
