r"""Plates: the particle plate, the data plate and its scale, the subsample a draw replays,
and the per-datum reduction of every site's log density.

A vectorised draw runs model and guide under an outer plate of ``N`` particles
(``PARTICLE_PLATE``, at dim ``-1 - max_plate_nesting``). The data plate is the plate
over data points whose dimension is kept, so that weights are normalised per datum: the
outermost plate enclosing every observed site, unless named. Its scale (full size / subsample
size) is applied after normalisation, never inside it. M draws of the globals (the nested
bound's outer plate) are a plate of their own (``GLOBAL_PLATE``) left of the particle plate.
"""

import contextlib

import pyro
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .checks import VECTORIZE_HINT
from .enumeration import contract_enumerated, masked_log_prob, wants_enumeration
from .sites import density_sites, is_auxiliary
from .util import ModelError

PARTICLE_PLATE = "_iwem_particles"
#: the outer plate of M draws of the globals β (``global_particles``), at the particle plate's dim - 1
GLOBAL_PLATE = "_iwem_globals"
#: the plates the sampler adds around a program (not the program's own)
ENGINE_PLATES = (PARTICLE_PLATE, GLOBAL_PLATE)


def vectorize(fn, num_particles, dim, global_latents=None, global_particles=1):
    """``fn`` run inside a particle plate of ``num_particles`` at ``dim``; the sites that
    ``global_latents`` (:class:`GlobalLatents`) calls global are drawn once, outside it, or
    ``global_particles`` = M times, in a plate of M draws at ``dim - 1`` around everything (the
    local sites then have a particle dim for each draw of β: ``(M, N, ...)``)."""

    def vectorized(*args, **kwargs):
        if global_latents is None or not global_latents.active:
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
                return fn(*args, **kwargs)
        once = DrawGlobalsOnce(global_latents)
        with contextlib.ExitStack() as stack:
            if global_particles > 1:
                stack.enter_context(pyro.plate(GLOBAL_PLATE, global_particles, dim=dim - 1))
            with once.outside, pyro.plate(PARTICLE_PLATE, num_particles, dim=dim), once.inside:
                return fn(*args, **kwargs)

    return vectorized


class GlobalLatents:
    """Which latent sites are globals :math:`\beta`, drawn once per draw: latents outside the
    data plate, not enumerated, of model or guide.

    Found from one unvectorised run (:meth:`from_traces`). A guide site outside the data plate
    that stands for per-datum latents cannot be drawn once: it couples the batch, which is then
    one datum (``coupling`` names it, and no site is global). Such a site is a guide site whose
    model site is inside the data plate, or an auxiliary site of its own (a joint autoguide's one
    vector, ``_AutoDiagonalNormal_latent``) when the model has latents inside the data plate; an
    auxiliary site that belongs to one guide site (``AutoNormal``'s ``s_unconstrained`` of ``s``)
    is global where that site is.

    :param str data_plate: the data plate's name (``None``: no data plate, nothing is global).
    :param bool has_locals: whether the model has a latent inside the data plate.
    :param tuple coupling: guide sites that couple the batch.
    :param tuple names: the model's global latents found in the run.
    """

    def __init__(self, data_plate=None, has_locals=True, coupling=(), names=()):
        self.data_plate = data_plate
        self.has_locals = has_locals
        self.coupling = tuple(coupling)
        self.names = tuple(names)

    @property
    def active(self):
        return self.data_plate is not None and not self.coupling

    @classmethod
    def from_traces(cls, data_plate, model_trace, guide_trace):
        if not data_plate:
            return cls(None)
        inside = {name for name, site in density_sites(model_trace)
                  if not site["is_observed"] and in_plate(site, data_plate)}  # fmt: skip
        coupling = []
        for name, site in density_sites(guide_trace):
            if site["is_observed"] or in_plate(site, data_plate):
                continue
            owner = name[: -len("_unconstrained")] if name.endswith("_unconstrained") else None
            owned = owner is not None and owner in guide_trace.nodes and owner not in inside
            if (is_auxiliary(site) and inside and not owned) or name in inside:
                coupling.append(name)
        found = cls(data_plate, bool(inside), coupling)
        found.names = tuple(name for name, site in density_sites(model_trace) if found.is_global(site))
        return found

    def is_global(self, site):
        """Whether sample site (or message) ``site`` is a global latent, drawn once."""
        if not self.active or site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            return False
        if site["infer"].get("_deterministic") or wants_enumeration(site) or site["infer"].get("_enumerate_dim") is not None:
            return False
        return not in_plate(site, self.data_plate)


class DrawGlobalsOnce:
    """Two messengers around the particle plate: ``inside`` keeps a global site's
    distribution as the model's plates left it, ``outside`` puts it back after the particle
    plate broadcast it and takes the particle plate off the site's stack, so that the site
    is drawn (and scored) once, without the particle dimension."""

    def __init__(self, global_latents):
        self.kept = {}
        self.inside = _KeepGlobal(global_latents, self.kept)
        self.outside = _RestoreGlobal(self.kept)


class _KeepGlobal(Messenger):
    def __init__(self, global_latents, kept):
        super().__init__()
        self.global_latents = global_latents
        self.kept = kept

    def _process_message(self, msg):
        if msg["type"] == "sample" and self.global_latents.is_global(msg):
            self.kept[msg["name"]] = msg["fn"]


class _RestoreGlobal(Messenger):
    def __init__(self, kept):
        super().__init__()
        self.kept = kept

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.kept:
            msg["fn"] = self.kept.pop(msg["name"])
            msg["cond_indep_stack"] = tuple(f for f in msg["cond_indep_stack"] if f.name != PARTICLE_PLATE)


def find_data_plate(model_trace):
    """The outermost vectorised plate enclosing every observed site of the model (every
    sample site if none is observed); ``False`` if there is none."""
    sites = [s for _, s in density_sites(model_trace) if s["is_observed"]] or [s for _, s in density_sites(model_trace)]
    stacks = [[f.name for f in s["cond_indep_stack"] if f.vectorized and f.name not in ENGINE_PLATES] for s in sites]
    common = set(stacks[0]).intersection(*stacks[1:]) if stacks else set()
    outermost = [name for name in (stacks[0] if stacks else []) if name in common]
    return outermost[0] if outermost else False


def data_frame(trace, data_plate):
    """The ``CondIndepStackFrame`` of ``data_plate`` in ``trace`` (``None`` for no data plate)."""
    if data_plate is None:
        return None
    for _, site in density_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == data_plate:
                return frame
    raise ModelError(f"data_plate '{data_plate}' is not a plate of the model")


def data_scale(frame):
    """The data plate's subsampling scale, full size / subsample size (1 without subsampling)."""
    if frame is None or frame.full_size is None or frame.size is None or frame.size < 1 or frame.full_size < 1:
        return 1.0
    return frame.full_size / frame.size


def in_plate(site, data_plate):
    """Whether ``site`` lies inside ``data_plate`` (every site does when there is none)."""
    return data_plate is None or any(f.name == data_plate for f in site["cond_indep_stack"])


def subsample_trace(*traces):
    """A trace holding only the subsample sites of ``traces``: replaying it fixes the minibatch."""
    kept = poutine.Trace()
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and site_is_subsample(site) and name not in kept.nodes and name not in ENGINE_PLATES:
                kept.add_node(name, **site)
    return kept


def plate_dims(*traces):
    """The nesting depths of the vectorised plates of ``traces``' density sites."""
    return [-frame.dim for trace in traces for _, site in density_sites(trace)
            for frame in site["cond_indep_stack"] if frame.vectorized]  # fmt: skip


class PerDatum:
    """Accumulates per-datum log densities: one ``(n, b)`` tensor per site (n ∈ {1, N},
    b ∈ {1, B}; ``(m, n, b)`` with the outer plate of M draws of β, m ∈ {1, M}), summed into
    named totals at the end.

    :param int ndim: the dims of a site's batch shape under the particle plate (and the outer plate).
    :param data_position: the position of the data plate's dim among them (``None``: no data plate).
    :param int lead: the leading dims kept: 1 (particles) or 2 (draws of β, then particles).
    """

    def __init__(self, ndim, data_position, lead=1):
        self.ndim = ndim
        self.data_position = data_position
        self.lead = lead
        self.terms = []  # (total name, site name, is latent, (n, b) tensor, in the data plate)
        self.global_terms = []  # (total name, site name, one value per draw of β): the globals' log densities

    def _full(self, name, log_prob):
        """``log_prob`` with all ``ndim`` dims (leading 1s added), or a ModelError naming the site."""
        if log_prob.dim() > self.ndim:
            raise ModelError(
                f"site '{name}' has batch shape {tuple(log_prob.shape)} with dims left of the particle plate "
                f"(dim {-self.ndim}): declare its batch dims with plates or .to_event(); {VECTORIZE_HINT}"
            )
        return log_prob.reshape((1,) * (self.ndim - log_prob.dim()) + log_prob.shape)

    def per_datum(self, name, log_prob):
        log_prob = self._full(name, log_prob)
        keep = set(range(self.lead)) | ({self.data_position} - {None})
        summed = [d for d in range(self.ndim) if d not in keep]
        if summed:
            log_prob = log_prob.sum(summed)
        return log_prob if self.data_position is not None else log_prob.unsqueeze(-1)

    def add(self, total, name, log_prob, latent, in_data_plate):
        self.terms.append((total, name, latent, self.per_datum(name, log_prob), in_data_plate))

    def add_global(self, total, name, log_prob, latent=True, in_data_plate=False):
        """A global site's log density: summed over all its dims, one number per draw of β."""
        self.global_terms.append((total, name, self._full(name, log_prob).sum(tuple(range(self.lead - 1, self.ndim)))))

    def global_names(self):
        return {name for _, name, _ in self.global_terms}

    def global_totals(self, like, draws=1):
        """Named ``(draws,)`` totals of the globals, one per draw of β (``log_global_p``, ``log_global_q``,
        ``log_global_model_proposed``; ``log_global_score`` only where a global has no pathwise gradient)."""
        out = {}
        for total, _, value in self.global_terms:
            out[total] = value if total not in out else out[total] + value
        zero = like.new_zeros(())
        for total in ("log_global_p", "log_global_q", "log_global_model_proposed"):
            out.setdefault(total, zero)
        return {k: v.reshape(-1).expand(draws) for k, v in out.items()}

    def add_enumerated(self, model_trace, enumerated, frame):
        """The enumerated sites' log densities ``[(site, log_prob)]`` (one common ``poutine.scale``),
        their enumerated dims summed out into one ``log_p`` term (``enumeration.contract_enumerated``),
        kept per datum unless a latent among them lies outside the data plate (``frame``): then the
        names of those latents are returned (they couple the batch)."""
        scales = {float(site["scale"]) for site, _ in enumerated}
        if len(scales) > 1:
            names = ", ".join(f"'{site['name']}'" for site, _ in enumerated)
            raise ModelError(f"sites {names} depend on an enumerated site and need one common poutine.scale")
        target = list(ENGINE_PLATES[: self.lead])  # the particle plate, and the draws of β
        outside = [site["name"] for site, _ in enumerated
                   if frame is not None and not site["is_observed"] and not in_plate(site, frame.name)]  # fmt: skip
        if frame is not None and not outside:
            target.append(frame.name)
        masked = [(site, masked_log_prob(log_prob, site)) for site, log_prob in enumerated]
        log_p = contract_enumerated(model_trace, masked, target) * (scales.pop() / data_scale(frame))
        self.add("log_p", enumerated[0][0]["name"], log_p, False, frame is not None and frame.name in target)
        return outside

    def has(self, total):
        return any(t[0] == total for t in self.terms)

    def batch_size(self):
        return max(t.shape[-1] for *_, t, _ in self.terms)

    def shared_latents(self):
        """Latent sites with one value for a batch of several data (a sizeless plate that broadcast)."""
        batch = self.batch_size()
        return [name for _, name, latent, t, _ in self.terms if latent and t.shape[-1] == 1 and batch > 1]

    def totals(self, shape, data_scale=None):
        """Named totals of ``shape`` (``(N, B)``, or ``(M, N, B)``); with ``data_scale``, the batch is
        one datum (the data plate's sites scaled by it and summed over the batch)."""
        out = {}
        for total, _, _, t, in_data_plate in self.terms:
            if data_scale is not None:
                t = (t * data_scale if in_data_plate else t).sum(-1, keepdim=True)
            out[total] = t if total not in out else out[total] + t
        return {k: v.expand(shape) for k, v in out.items()}


def global_sites(trace, global_latents):
    """``(name, site)`` of the global latents of ``trace`` (drawn once per call)."""
    return ((name, site) for name, site in density_sites(trace) if global_latents.is_global(site))
