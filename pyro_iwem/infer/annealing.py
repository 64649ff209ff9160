"""The annealing controller α of IWEM (§3.3.2, Algorithm 2)."""



class Annealing:
    r"""The annealing controller of eq. (8): :math:`\alpha = \min(a_0 + c \lfloor t / n_u \rfloor, 1)`.

    α starts at ``start`` and grows by ``increment`` (c) after every ``every`` (:math:`n_u`)
    counted updates, capped at ``stop``. What counts as an update is ``unit``:

    * ``unit="step"``: :meth:`step` (called by :meth:`IWEM.step` after every optimisation
      step) advances the count; :meth:`end_epoch` does nothing;
    * ``unit="epoch"``: :meth:`end_epoch` (call it, or :meth:`IWEM.end_epoch`, after each
      epoch) advances the count; :meth:`step` does nothing.

    The paper's schedule is ``Annealing(0.01, every=1, unit="epoch")``: α reaches 1 after
    100 epochs. The default, ``Annealing()``, counts steps with ``every=500``, which is the
    same schedule for the paper's 50 000-image training sets at batch size 100.
    """

    def __init__(self, increment=0.01, every=500, start=0.0, stop=1.0, unit="step"):
        if not increment > 0:
            raise ValueError(f"Annealing: increment must be > 0, got {increment}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"Annealing: every must be a positive integer, got {every!r}")
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"Annealing: need 0 <= start <= stop <= 1, got start={start}, stop={stop}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"Annealing: unit must be 'step' or 'epoch', got {unit!r}")
        self.increment = increment
        self.every = every
        self.start = start
        self.stop = stop
        self.unit = unit
        self.count = 0

    @classmethod
    def over(cls, num_steps, increments=100):
        r"""α from 0 to 1 in about ``increments`` equal steps over a run of ``num_steps`` steps,
        reaching 1 at step ``num_steps`` and not before: the paper's schedule fitted to a run of
        any length, e.g. ``IWEM(model, guide, annealing=Annealing.over(3000))`` for 3 000 steps.
        The increments come every ``d`` steps, ``d`` the largest divisor of ``num_steps`` not
        above ``num_steps / increments`` (so a prime ``num_steps`` raises α every step)."""
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise ValueError(f"Annealing.over: num_steps must be a positive integer, got {num_steps!r}")
        every = max(d for d in range(1, max(1, num_steps // increments) + 1) if num_steps % d == 0)
        return cls(increment=every / num_steps, every=every)

    @property
    def alpha(self):
        """The current α: ``start + increment * (count // every)``, capped at ``stop``."""
        alpha = self.start + self.increment * (self.count // self.every)
        return self.stop if alpha >= self.stop - 1e-9 else alpha  # n increments of 1/n reach 1

    def step(self):
        """Count one optimisation step (``unit="step"``)."""
        if self.unit == "step":
            self.count += 1

    def end_epoch(self):
        """Count one epoch (``unit="epoch"``)."""
        if self.unit == "epoch":
            self.count += 1

    def state_dict(self):
        """The count of steps or epochs so far (the rest is configuration)."""
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = int(state["count"])

    def __repr__(self):
        return (
            f"Annealing(increment={self.increment}, every={self.every}, start={self.start}, "
            f"stop={self.stop}, unit={self.unit!r}) at alpha={self.alpha:.3f}"
        )


class NoAnnealing(Annealing):
    """α ≡ 1: the E-step is the plain snIS objective of eq. (2) (IWEM-woa)."""

    def __init__(self):
        super().__init__(increment=1.0, every=1, start=1.0, stop=1.0)

    def __repr__(self):
        return "NoAnnealing()"
