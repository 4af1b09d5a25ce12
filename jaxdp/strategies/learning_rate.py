"""The learning-rate rule of DPSGD's Corollary 1 (Mohamad et al., seeds/002), reconstructed.

The paper's symbols were lost in text extraction. The paper states that its Corollary 1 reduces to
Corollary 2 of Lian et al. (2015) (asynchronous distributed SGD: one thread, one local step) and to
Theorem 1 of Zhao et al. (2017) (lock-free parallel SGD: one worker, master batch one). Both set a
constant step size of the form sqrt(gap / (L · σ² · iterations · parallelism)). The rule that
reduces to both, with equal and constant local and global rates, is

    η = sqrt( (f(θ_1) − f*) / (L · σ² · K · M · B · P) )

with K master iterations, M update vectors aggregated per master step, B local steps per round and
P lock-free threads per worker. With it the ergodic rate is

    (1 / K) Σ_k E ||∇f(θ_k)||² = O( sqrt( (f(θ_1) − f*) · L · σ² / (K · M · B · P) ) ),

i.e. O(1 / sqrt(K·M·B·P)): linear speed-up in the total number of stochastic gradients, provided
the delays stay small next to K (below).

Assumptions (paper, Assumptions 1-6 and Theorem 1):

* f is L-smooth (``smoothness``) and bounded below by f*; ``initial_gap`` is f(θ_1) − f*.
* Stochastic gradients are unbiased with variance at most σ² (``gradient_variance``), sampled
  independently of the staleness and of the overwrites.
* Bounded staleness: the anchor a worker's Δ was computed from is at most T master steps old
  (asynchrony), and a thread's read is at most τ local updates old (lock-free threads).
* Overwrite model: a lock-free write may be lost to another thread's write (Zhao et al., 2017), with
  the overwrite matrix independent of the sampled data.
* K is large enough relative to the delays (roughly K ≥ c · M·B·P · (T + 1)² · L · gap / σ², a
  bound of the form in Lian et al. Cor. 2); only then the delays' effect vanishes and the rate is
  delay-independent.

This is a reconstruction; the constant factor in front of the rate is not reproduced.

How to use η (one convention). In the paper's analysis (the synthetic sequence) every stochastic
gradient moves the parameters by η: locally u ← u − η_l g, and the master applies η_g to the *sum of
the gradients* behind the M update vectors it aggregates, θ ← θ − η_g Σ_m Σ_b g; Corollary 1 sets
η_l = η_g = η. In jaxdp the update vector is Δ = anchor − local, which already carries η_l
(Δ = η_l Σ_b g for ``inner = optax.sgd(η_l)``). So a paper global rate η_g is
``outer = optax.sgd(η_g / η_l)`` on the *sum* of the Δ's, and Corollary 1 is

    inner = optax.sgd(η),   outer = optax.sgd(1.0) on Σ_m Δ_m     (θ ← θ − η Σ_m Σ_b g),

not ``outer = optax.sgd(η)``, which would apply η twice (η²). Where the Δ's are *averaged* over N
workers instead of summed (``jaxdp.local_steps(..., axis_name=...)``), the sum is recovered with
``outer = optax.sgd(N)``; ``optax.sgd(1.0)`` there is model averaging, θ ← θ − (η / N) Σ_m Σ_b g.
"""

from __future__ import annotations

import math
import numbers


def _positive_int(name: str, value: object) -> int:
    # Integral floats (1e6 iterations) are accepted; bools are not numbers here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dpsgd_learning_rate: {name} must be an int, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"dpsgd_learning_rate: {name} must be a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"dpsgd_learning_rate: {name} must be >= 1, got {value}")
    return int(value)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dpsgd_learning_rate: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"dpsgd_learning_rate: {name} must be a finite number > 0, got {value}")
    return value


def dpsgd_learning_rate(
    num_iterations: int,
    num_workers: int = 1,
    num_threads: int = 1,
    local_steps: int = 1,
    *,
    master_batch: int | None = None,
    smoothness: float = 1.0,
    gradient_variance: float = 1.0,
    initial_gap: float = 1.0,
) -> float:
    """The constant, equal local and global learning rate η of DPSGD's Corollary 1 (reconstructed).

    ``η = sqrt(initial_gap / (smoothness · gradient_variance · K · M · B · P))``, which gives the
    ergodic rate O(1/sqrt(K·M·B·P)) for L-smooth non-convex objectives with unbiased,
    bounded-variance gradients, bounded staleness and the lock-free overwrite model, once K is large
    enough relative to the delays. See the module docstring for the assumptions and the
    reconstruction (the paper reduces to Lian et al. 2015 Cor. 2 with P = B = 1, and to
    Zhao et al. 2017 Thm. 1 with M = 1).

    The number of workers enters through the master batch M (default: ``num_workers``, the
    paper's experimental setting "the global batch was set to the number of nodes"); more workers
    also mean more staleness, which the rule assumes small next to K.

    Args:
      num_iterations: K >= 1, the number of master (global) iterations.
      num_workers: N >= 1, the number of workers; the default of ``master_batch``.
      num_threads: P >= 1, lock-free threads per worker.
      local_steps: B >= 1, local iterations per round (``sync_every`` of :func:`jaxdp.local_steps`).
      master_batch: M >= 1, update vectors aggregated per master step (default ``num_workers``).
      smoothness: L > 0, the Lipschitz constant of the gradient.
      gradient_variance: σ² > 0, the bound on the stochastic gradients' variance.
      initial_gap: f(θ_1) − f* > 0.

    Returns:
      The learning rate η (a Python float), the step on each stochastic gradient: use it as
      ``inner = optax.sgd(η)`` with ``outer = optax.sgd(1.0)`` applied to the sum of the update
      vectors (jaxdp's Δ already carries η; see the module docstring), not as ``outer = sgd(η)``.

    Example:
      >>> import jaxdp
      >>> jaxdp.dpsgd_learning_rate(100, num_workers=4, local_steps=25)
      0.01
    """
    num_iterations = _positive_int("num_iterations", num_iterations)
    num_workers = _positive_int("num_workers", num_workers)
    num_threads = _positive_int("num_threads", num_threads)
    local_steps = _positive_int("local_steps", local_steps)
    master_batch = num_workers if master_batch is None else _positive_int("master_batch", master_batch)
    smoothness = _positive_float("smoothness", smoothness)
    gradient_variance = _positive_float("gradient_variance", gradient_variance)
    initial_gap = _positive_float("initial_gap", initial_gap)

    parallelism = num_iterations * master_batch * local_steps * num_threads
    return math.sqrt(initial_gap / (smoothness * gradient_variance * parallelism))
