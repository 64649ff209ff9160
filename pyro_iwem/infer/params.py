r"""θ and φ by what each density depends on, found from the autograd graph.

IWEM steps two groups of parameters with two objectives: the M-step steps θ, the parameters
:math:`\log p(x, z; \theta)` depends on with the latents :math:`z` held fixed; the P-step
steps φ, the parameters the guide's distributions depend on, less θ (docs/iwem.md, "θ and φ
from the graph": the P-step never updates θ, even when a proposal calls the decoder). Which Pyro
program *registers* a parameter does not decide it: a network registered whole in model and
guide with one ``pyro.module`` (Pyro's semi-supervised VAE) has its decoder in θ and its encoder
in φ.

The split is read off the graph of one draw of particles: the leaves reachable from
:math:`\log p` without passing through a latent value the guide drew are θ; those reachable
from :math:`\log q` and the guide's latent values are the guide's. It is cached per structure
(the parameter names and the sample sites of model and guide, observed or not), so a step
walks the graph only when the programs take a new branch: a labelled batch of a
semi-supervised model, whose guide does not call the classifier, has a split of its own.
"""

from typing import NamedTuple


class ParamGroups(NamedTuple):
    """Unconstrained parameter tensors: ``theta`` (the model's density), ``phi`` (the guide's
    distributions, less θ) and ``shared`` (θ parameters the guide's distributions use too).

    Each is a tuple in trace order (the guide's parameter sites, then the model's others), the
    same on every process that runs the same programs: an optimiser that all-reduces gradients
    (:class:`pyro_iwem.distributed.DistributedOptim`) is handed them in one order.
    ``shared`` is a subset of ``theta``, ``phi`` is disjoint from it."""

    theta: tuple
    phi: tuple
    shared: tuple


def graph_leaves(roots, stop=()):
    """The leaf tensors (parameters) the autograd graph of ``roots`` reaches, without passing
    through the tensors in ``stop`` (their own ancestors are not visited)."""
    stop_nodes = {t.grad_fn for t in stop if t.grad_fn is not None}
    stop_leaves = {id(t) for t in stop if t.grad_fn is None}
    pending = [r.grad_fn for r in roots if r is not None and getattr(r, "grad_fn", None) is not None]
    leaves, seen = [], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen or node in stop_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in stop_leaves:
                leaves.append(variable)
            continue
        pending.extend(child for child, _ in node.next_functions)
    return leaves


def global_guide_params(particles, params):
    """The tensors of ``params`` that the globals' proposal :math:`q(\beta)` depends on (its
    log density and the values it drew), the global guide's parameters, in ``params``' order."""
    roots = [particles.log_global_q, particles.log_global_score, *particles.global_latents]
    found = {id(t) for t in graph_leaves([r for r in roots if r is not None])}
    return tuple(p for p in params if id(p) in found)


class ParamSplitter:
    """Finds and caches the θ/φ split of a model and guide from their graphs (see module doc)."""

    def __init__(self):
        self._theta = {}  # (param names, site structure) -> θ names
        self._guide = {}  # the same key -> names the guide's distributions depend on

    def __call__(self, particles):
        """:class:`ParamGroups` for ``particles``; φ is empty when the guide ran without a graph."""
        params = {**particles.guide_params, **particles.model_params}
        key = (frozenset(params), particles.structure)
        ids = {id(t): name for name, t in params.items()}
        if key not in self._theta and particles.log_p.requires_grad:
            stop = particles.latents + particles.global_latents
            leaves = graph_leaves([particles.log_p, particles.log_global_p], stop=stop)
            self._theta[key] = frozenset(ids[id(t)] for t in leaves if id(t) in ids)
        if key not in self._guide and particles.guide_has_graph:
            roots = [particles.log_q, particles.log_score, *particles.latents, *particles.global_latents,
                     particles.log_global_q, particles.log_global_score]  # fmt: skip
            leaves = graph_leaves([r for r in roots if r is not None])
            self._guide[key] = frozenset(ids[id(t)] for t in leaves if id(t) in ids)
        theta = self._theta.get(key, frozenset())
        guide = self._guide.get(key, frozenset())
        return ParamGroups(  # in the trace's order, never a set's
            theta=tuple(t for n, t in params.items() if n in theta),
            phi=tuple(t for n, t in params.items() if n in guide and n not in theta),
            shared=tuple(t for n, t in params.items() if n in guide and n in theta),
        )
