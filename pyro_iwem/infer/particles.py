r"""One draw of particles: per-particle, per-datum log densities and what produced them."""

from dataclasses import dataclass, field, replace

import torch
from pyro import poutine

from .params import ParamSplitter

#: The ``(N, B)`` tensors of :class:`Particles`, concatenated along the particles by :meth:`Particles.cat`.
DENSITIES = ("log_p", "log_q", "log_model_proposed", "log_score", "log_score_leaves", "log_q_unstopped")
#: The ``(1,)`` tensors of the globals, one entry per draw of β.
GLOBAL_DENSITIES = (
    "log_global_p", "log_global_q", "log_global_model_proposed", "log_global_score", "log_global_q_unstopped",
)


@dataclass
class Particles:
    r"""Per-particle, per-datum log densities of one draw; tensors are ``(N, B)``.

    * ``log_p``: :math:`\log p(x_i, z_{ik}; \theta)`, every model site summed: observed
      sites, latents the guide proposed, latents the model proposed itself (such as the
      missing entries of an ``obs_mask`` site); enumerated sites summed out.
    * ``log_q``: :math:`\log q(z_{ik} \mid x_i; \phi)`, every guide site summed.
    * ``log_model_proposed``: the part of ``log_p`` from latents the model proposed.
    * ``log_score``: the log density of the proposal's non-reparameterised sites whose values
      the weights depend on (``None`` when there are none): the term a score-function
      estimator multiplies by its learning signal.
    * ``log_score_leaves``: the same for model-proposed sites nothing else depends on (the
      missing entries of an ``obs_mask`` site): they matter only to objectives that use the
      full :math:`\log p`, such as IWEM's optimal P-step.
    * ``scale``: the data plate's subsampling scale (full size / subsample size); the
      tensors above are unscaled, so weights are normalised per datum before scaling.
    * ``log_global_p``, ``log_global_q``, ``log_global_model_proposed``, ``log_global_score``:
      with global latents :math:`\beta` (latents outside the data plate, drawn once per draw
      outside the particle plate), :math:`\log p(\beta)`, :math:`\log q(\beta)`, the part of
      :math:`\log p(\beta)` the model proposed, and the score term of the non-reparameterised
      globals: one entry per draw of :math:`\beta`, shape ``(1,)``, not per datum (``None``
      without globals). The tensors above are then given :math:`\beta`:
      :math:`\log p(x_i, z_{ik} \mid \beta)` and :math:`\log q(z_{ik} \mid x_i, \beta)`.
    * ``global_sites``: the names of the global latents.

    Which site feeds which tensor is the table of :mod:`pyro_iwem.infer.sites`. The
    importance weight of a particle is the joint over the whole proposal density,
    ``log_w = log_p - log_q - log_model_proposed``: model-proposed sites cancel.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    log_model_proposed: torch.Tensor
    scale: float
    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    log_score: torch.Tensor | None = None
    log_score_leaves: torch.Tensor | None = None
    latents: list = field(default_factory=list)
    #: the tensors the model replayed for ``latents`` (the same ones, or their leaf copies
    #: when drawn with :class:`~pyro_iwem.infer.transforms.CutLatents`; ``None`` for a guide-only site)
    model_latents: list = field(default_factory=list)
    model_params: dict = field(default_factory=dict)
    guide_params: dict = field(default_factory=dict)
    subsample: poutine.Trace | None = None
    model_proposed: tuple = ()
    guide_has_graph: bool = False
    splitter: ParamSplitter | None = None
    structure: frozenset = frozenset()
    latent_event_dims: list = field(default_factory=list)
    layout: tuple | None = None  # (dims of a site's batch shape, position of the data dim): vectorised only
    log_global_p: torch.Tensor | None = None
    log_global_q: torch.Tensor | None = None
    log_global_model_proposed: torch.Tensor | None = None
    log_global_score: torch.Tensor | None = None
    global_sites: tuple = ()
    #: the baseline of the REINFORCE term of non-reparameterised globals (objectives.outer_bound;
    #: ``None``: 0), set by the loss from earlier draws only
    global_baseline: float | None = None
    #: the guide's global latent values (``log_global_*`` and these are the first draw's in :meth:`cat`)
    global_latents: list = field(default_factory=list)
    #: with globals and a transform that changes log q (StopProposalParams): ``log_q`` and
    #: ``log_global_q`` as the guide's own distributions give them (``None`` otherwise)
    log_q_unstopped: torch.Tensor | None = None
    log_global_q_unstopped: torch.Tensor | None = None
    #: the tensors the model replayed for ``global_latents`` (as ``model_latents``)
    global_model_latents: list = field(default_factory=list)
    #: one of M draws of β drawn in one outer plate (:meth:`split`): this draw's index along the
    #: leading dim of the traces' values and the latents, which are the whole plate's (``None``: its own)
    outer_index: int | None = None

    @classmethod
    def cat(cls, draws):
        """One :class:`Particles` of the particles of ``draws`` (draws of the same programs on
        the same data, e.g. one particle each), concatenated along the particles; traces,
        parameters and the rest are the first draw's, and ``layout`` is ``None`` (latents
        are not one tensor per site)."""
        first = draws[0]
        densities = {}
        for name in DENSITIES:
            values = [getattr(p, name) for p in draws]
            densities[name] = None if values[0] is None else torch.cat(values, 0)
        return replace(
            first,
            **densities,
            latents=[z for p in draws for z in p.latents],
            model_latents=[z for p in draws for z in p.model_latents],
            layout=None,
        )

    def split(self):
        """The draws of an outer plate of M draws of the globals (the sampler's ``(M, N, B)``
        densities and ``(M,)`` global densities): M :class:`Particles`, draw m's densities
        ``[m]`` and ``[m:m+1]``; traces, parameters and latents are the whole plate's (one graph),
        and ``layout`` is ``None`` (a latent is not draw m's alone; :meth:`own` takes its part)."""
        # unbind and split: one backward node for all draws (indexing would fill a whole-plate
        # gradient per draw, M² work)
        densities = {n: getattr(self, n).unbind(0) for n in DENSITIES if getattr(self, n) is not None}
        global_densities = {n: getattr(self, n).split(1) for n in GLOBAL_DENSITIES if getattr(self, n) is not None}
        return [
            replace(
                self,
                **{n: parts[m] for n, parts in densities.items()},
                **{n: parts[m] for n, parts in global_densities.items()},
                layout=None,
                outer_index=m,
            )
            for m in range(self.log_p.shape[0])
        ]

    def own(self, value):
        """This draw's part of ``value``, a value of the traces or a latent: ``value[outer_index]``
        for one of the draws of an outer plate (:meth:`split`), else ``value`` itself."""
        return value if self.outer_index is None else value[self.outer_index]

    @property
    def log_w(self):
        return self.log_p - self.log_q - self.log_model_proposed

    @property
    def log_global_w(self):
        r""":math:`\log p(\beta) - \log q(\beta)`, ``(1,)`` (zero without globals)."""
        if self.log_global_p is None:
            return self.log_p.new_zeros(1)
        return self.log_global_p - self.log_global_q - self.log_global_model_proposed

    @property
    def data_size(self):
        """The number of data the batch stands for, scale × batch size (the N of L_K's N/B)."""
        return self.scale * self.log_p.shape[1]

    @property
    def num_particles(self):
        return self.log_p.shape[0]

    def param_groups(self):
        """θ, φ and their overlap, found from this draw's graph (``pyro_iwem.infer.params``)."""
        return self.splitter(self)

    def per_latent(self, per_datum):
        """``per_datum`` ``(N, B)`` reshaped to broadcast against each latent in ``latents``
        (vectorised draws only): its particle and data dims where the latent has them."""
        ndim, data_position = self.layout
        shape = [1] * ndim
        shape[0] = per_datum.shape[0]
        if data_position is not None:
            shape[data_position] = per_datum.shape[1]
        batch = per_datum.reshape(shape)
        return [batch.reshape(batch.shape + (1,) * event_dim) for event_dim in self.latent_event_dims]
