r"""Model sites summed out exactly, with Pyro's own enumeration machinery.

A model site marked ``infer={"enumerate": "parallel"}`` (or by
:func:`pyro.infer.config_enumerate`) that the guide does not sample is enumerated by
:class:`pyro.poutine.enum` at dims left of the particle plate, and the log densities of the
sites that depend on it are contracted with :func:`pyro.ops.contract.contract_to_tensor`
(sum over the enumerated values, product over the plates inside the data plate), so that for
each particle and datum

.. math::
    \log p(x_i, z_{ik}) = \log \sum_c p(x_i, c, z_{ik}).

Annotations that cannot be honoured here (sequential enumeration, a distribution without
an enumerable support, a site the guide samples) are dropped with a warning that names the
site: such a site is sampled instead, with a score-function gradient.
"""

from collections import OrderedDict

from pyro.distributions.util import scale_and_mask
from pyro.ops.contract import contract_to_tensor
from pyro.ops.packed import pack, unpack
from pyro.poutine.messenger import Messenger

from .util import warn_once


def wants_enumeration(site):
    return site["infer"].get("enumerate") is not None and not site["is_observed"]


class EnumerationAnnotations(Messenger):
    """Records whether any model site asks for enumeration (as the model wrote it)."""

    found = False

    def _pyro_sample(self, msg):
        self.found = self.found or wants_enumeration(msg)


class EnumerationPolicy(Messenger):
    """Runs inside :class:`pyro.poutine.enum`: drops the enumeration annotations it cannot
    honour (warning once per site) so that those sites are sampled instead."""

    def __init__(self, guide_trace, warned):
        super().__init__()
        self.guide_trace = guide_trace
        self.warned = warned

    def _pyro_sample(self, msg):
        if not wants_enumeration(msg):
            return
        name, how = msg["name"], msg["infer"]["enumerate"]
        if name in self.guide_trace.nodes:
            reason = "the guide samples it, so the guide's value is used; leave it out of the guide to sum it out"
        elif how != "parallel":
            reason = f"enumerate={how!r} is not supported (only 'parallel'); it is sampled from the model instead"
        elif not getattr(msg["fn"], "has_enumerate_support", False):
            reason = (
                f"its distribution ({type(msg['fn']).__name__}) has no finite support to enumerate; "
                "it is sampled from the model instead, with a score-function gradient"
            )
        else:
            return
        warn_once(self.warned, ("enumerate", name), f"model site '{name}' is marked for enumeration, but {reason}")
        msg["infer"] = {k: v for k, v in msg["infer"].items() if k != "enumerate"}


def contract_enumerated(trace, sites, target_plates):
    r"""Sums the enumerated dims out of the product of ``sites``' log densities.

    :param trace: the model trace (its dims are symbolised here).
    :param sites: ``[(site, log_prob)]`` with the log densities masked (Pyro applies the
        mask inside and the scale outside the sum; the caller applies the shared scale).
    :param target_plates: names of the plates kept (particles, data); other plates are
        product-contracted.
    :returns: an ordinary tensor whose dims are those of ``target_plates``.
    """
    trace.symbolize_dims()
    plate_symbols = set(trace.plate_to_symbol.values())
    tree, sum_dims = OrderedDict(), set()
    for site, log_prob in sites:
        dim_to_symbol = site["infer"]["_dim_to_symbol"]
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        tree.setdefault(ordinal, []).append(pack(log_prob, dim_to_symbol))
        sum_dims.update(s for s in dim_to_symbol.values() if s not in plate_symbols)
    present = {symbol for terms in tree.values() for term in terms for symbol in term._pyro_dims}
    target = frozenset(  # a plate of size 1 has no dim in the packed terms
        trace.plate_to_symbol[name] for name in target_plates if trace.plate_to_symbol.get(name) in present
    )
    return unpack(contract_to_tensor(tree, sum_dims, target_ordinal=target), trace.symbol_to_dim)


def masked_log_prob(log_prob, site):
    return scale_and_mask(log_prob, 1.0, site["mask"])
