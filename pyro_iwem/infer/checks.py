"""The checks a draw runs on a user's model, guide and data, each raising a
:class:`~pyro_iwem.infer.util.ModelError` (or warning) that names the site, argument or datum."""

import math

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from .enumeration import wants_enumeration
from .sites import base_distribution, density_sites, is_auxiliary
from .util import ModelError, warn_once

VECTORIZE_HINT = (
    "if the model or guide is written for one particle at a time (explicit batch shapes such as "
    "x.view(n, -1) or torch.cat(..., dim=1) on latents, recurrent cells, control flow on values), "
    "pass vectorize_particles=False"
)


def with_vectorize_hint(error):
    """``error`` with :data:`VECTORIZE_HINT` appended to its message (a torch shape error in
    a vectorised draw usually means a model written for one particle)."""
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n({VECTORIZE_HINT})",) + error.args[1:]
    return error


def vectorized_draw_error(error):
    """The error to raise for ``error`` from a vectorised draw: a :class:`ShapeMismatch` with the
    shapes' particle dims explained (and :data:`VECTORIZE_HINT` unless a plate is the cause: a
    model written for one particle looks like a guide of the wrong shape), another ModelError
    as it is, a torch error after :func:`check_finite_params`, with the hint."""
    if isinstance(error, ShapeMismatch):
        while isinstance(error.__cause__, ShapeMismatch):  # Pyro re-raises it with the trace's shapes appended
            error = error.__cause__
        error = ShapeMismatch(f"{error.message} (in the shapes, the leftmost dim is the draw's particles)", error.plate)
        return error if error.plate else with_vectorize_hint(error)
    if isinstance(error, ModelError):
        return error
    check_finite_params(error)
    return with_vectorize_hint(error)


def check_finite_inputs(args, kwargs, error):
    """Re-raises ``error`` (from running the guide) as a :class:`ModelError` naming the
    argument, if an input holds NaN or Inf; returns otherwise."""
    named = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelError(
                f"argument {name} passed to the guide contains NaN or Inf values; fill missing entries "
                "with any finite value and mark them with obs_mask= or pyro_iwem.observe_masked"
            ) from error


def warn_guide_enumeration(name, site, warned):
    """Warns once about a guide site marked for enumeration: guides are sampled, not enumerated."""
    if wants_enumeration(site) and not is_auxiliary(site):
        warn_once(
            warned,
            ("guide-enumerate", name),
            f"guide site '{name}' is marked for enumeration: guides are sampled here, not enumerated, "
            "so it gets a score-function gradient; to sum it out exactly, leave it out of the guide and "
            "mark the model's site",
        )


class ShapeMismatch(ModelError):
    """A guide's value whose shape is not the one the model's distribution gives the site;
    ``message`` is the error's own text (Pyro appends its trace's shapes to ``args``), and
    ``plate`` the model's plate the guide's site lacks, if that is the cause."""

    def __init__(self, message, plate=None):
        super().__init__(message)
        self.message = message
        self.plate = plate


def check_finite_params(error):
    """Re-raises ``error`` (from running the programs) as a :class:`ModelError` naming the
    parameters of Pyro's param store that hold NaN or Inf (a diverged fit: the distributions'
    argument checks are what fails then); returns if every parameter is finite."""
    store = pyro.get_param_store()
    bad = [name for name in store.keys() if not torch.isfinite(store.get_param(name).detach()).all()]
    if bad:
        raise ModelError(
            f"parameter{'s' if len(bad) > 1 else ''} {', '.join(repr(n) for n in bad[:5])}"
            f"{' and more' if len(bad) > 5 else ''} hold{'' if len(bad) > 1 else 's'} NaN or Inf values: the fit "
            f"has diverged (try a smaller learning rate), and the programs fail on them ({error})"
        ) from error


def check_guide_plates(model_trace, guide_trace):
    """Every plate of the guide must be a plate of the model (as Pyro's ELBOs require): a plate
    only the guide has would scale or index guide sites the model sees unscaled."""
    def plates(trace):  # a vectorised draw's particle plate is in both
        return {name for name, site in trace.nodes.items() if site["type"] == "sample" and site_is_subsample(site)}

    missing = sorted(plates(guide_trace) - plates(model_trace))
    if missing:
        raise ModelError(
            f"the guide has the plate '{missing[0]}', which the model does not: every plate of the guide must "
            "also be a plate of the model (with the same name and size)"
        )


def check_param_names(model_params, guide_params):
    """A parameter name the model and the guide both use must be one parameter (``model_params``
    and ``guide_params``: :func:`~pyro_iwem.infer.sites.param_values` of the two traces). With
    ``pyro.settings.set(module_local_params=True)`` two root ``PyroModule`` s each have their
    own ``loc`` under the same site name; the θ/φ split (:class:`~pyro_iwem.infer.params.ParamSplitter`)
    and Pyro's ``SVI`` both know parameters by name, so the guide's would silently never be trained."""
    for name, value in guide_params.items():
        if name in model_params and model_params[name] is not value:
            raise ModelError(
                f"the model and the guide each have their own parameter '{name}' (module-local parameters "
                "of PyroModules with the same name): one name cannot stand for two parameters, and one of "
                "them would never be trained; name the modules apart, e.g. PyroModule.__init__(self, "
                f"name=\"guide\") gives the guide's 'guide.{name}'"
            )


def check_replayed_shape(name, site, guide_site=None):
    """A latent replayed from the guide must have the shape the model's distribution gives it;
    if the guide samples it outside a plate the model samples it in, the error says so."""
    value, fn = site["value"], site["fn"]
    expected = tuple(fn.batch_shape + fn.event_shape)
    expected = expected[max(0, len(expected) - value.dim()) :]  # enumerated dims left of the value's
    event = tuple(fn.event_shape)
    try:
        broadcast = tuple(torch.broadcast_shapes(value.shape, expected))
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(value.shape) or tuple(value.shape[value.dim() - len(event) :]) != event:
        plates = [f.name for f in site["cond_indep_stack"] if f.vectorized]
        guide_plates = {f.name for f in guide_site["cond_indep_stack"]} if guide_site is not None else set(plates)
        missing = next((p for p in plates if p not in guide_plates), None)
        cause = (
            f"; the model samples it inside the plate '{missing}', and the guide outside it: sample it in the "
            "guide inside the same plate" if missing else "; make the guide sample the site with the model's shape"
        )
        raise ShapeMismatch(
            f"site '{name}': the guide's value has shape {tuple(value.shape)}, but the model's distribution "
            f"has batch shape {tuple(fn.batch_shape)} and event shape {event}{cause}",
            plate=missing,
        )


def check_batch_dims_declared(name, site):
    """Every batch dim of size > 1 must belong to a plate: the particle plate goes left of them."""
    declared = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
    shape = site["fn"].batch_shape
    undeclared = [d - len(shape) for d, size in enumerate(shape) if size > 1 and d - len(shape) not in declared]
    if undeclared:
        raise ModelError(
            f"site '{name}' has batch shape {tuple(shape)}, and its dim {undeclared[0]} belongs to no plate: "
            "declare every batch dim with a pyro.plate, or move it into the event with .to_event()"
        )


def check_observed(name, site):
    """An observed value must be finite (missing entries are masked, not NaN)."""
    value = site["value"]
    if torch.is_floating_point(value) and not torch.isfinite(value).all():
        raise ModelError(
            f"observed site '{name}' contains NaN or Inf values; fill missing entries with any finite "
            "value and mark them with obs_mask= or pyro_iwem.observe_masked"
        )


def check_log_weights(log_w, traces=()):
    """Importance log weights ``(N, B)``: none NaN, and some particle of every datum possible.

    A NaN names its datum and particle and, looked up only then, the first site of ``traces``
    (``(program, trace)`` pairs: "model", "guide") whose log density is NaN."""
    nan = torch.isnan(log_w)
    if nan.any():
        particle, datum = (int(i) for i in nan.nonzero()[0])
        raise ModelError(f"NaN importance log weight for datum {datum} (particle {particle}): {_nan_site(traces)}")
    dead = (log_w == -math.inf).all(0)
    if dead.any():
        index = dead.nonzero()[0].item()
        raise ModelError(
            f"all {log_w.shape[0]} importance log weights are -inf for datum {index}: the guide only "
            "proposes values where the model has zero density"
        )


def refuse_or_warn_coupled(coupled, data_plate, joint_guide_sites, explicit_data_plate, warned):
    """Sites that couple the data of the data plate, so that the batch is weighted as one datum:
    refused when the user named the data plate, else warned about once each, with why."""
    def why(name):
        if name in joint_guide_sites:
            return (
                "a guide site outside the data plate standing for per-datum latents, such as a joint autoguide's "
                "one vector for the whole batch (AutoDiagonalNormal, AutoMultivariateNormal, ...); for per-datum "
                "weights use AutoNormal or an amortised guide, which sample them inside the data plate"
            )
        return (
            "a latent in a plate the data do not fill, or an enumerated site outside the data plate whose sum "
            "runs over every datum; a global latent (outside the data plate, not enumerated) is drawn once and "
            "does not couple"
        )

    if coupled and explicit_data_plate:
        raise ModelError(
            f"site '{coupled[0]}' couples the data of the data plate '{data_plate}' ({why(coupled[0])}): "
            "per-datum importance weights need it inside the plate (pass data_plate=None to treat the batch "
            "as one datum)"
        )
    for name in coupled:
        warn_once(
            warned,
            ("outside", name),
            f"latent site '{name}' couples the data of the data plate '{data_plate}' ({why(name)}): "
            "the minibatch is weighted as one datum, with one importance weight per particle and an ESS out "
            "of K for the whole batch",
        )


def _nan_site(traces):
    """Which site of ``traces`` has a NaN log density, in words (its parameters too, if NaN)."""
    for program, trace in traces:
        for name, site in density_sites(trace):
            with torch.no_grad():
                try:
                    log_prob = site["fn"].log_prob(site["value"])
                except (ValueError, RuntimeError):
                    continue
            if torch.isnan(log_prob).any():
                params = [k for k, v in vars(base_distribution(site["fn"])).items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point() and torch.isnan(v).any()]  # fmt: skip
                what = f" (its distribution's {', '.join(params)} holds NaN: has training diverged?)" if params else ""
                return f"{program} site '{name}' has a NaN log density{what}"
    return "a model or guide log density is NaN"


def warn_all_global(warned, data_plate, names):
    """Warns once that every latent is global (``names``, outside ``data_plate``): L_K is then the ELBO."""
    warn_once(
        warned,
        "all-global",
        f"every latent of the model is global (outside the data plate '{data_plate}': "
        f"{', '.join(repr(n) for n in names)}): they are drawn once per step, and the bound L_K is "
        "the ELBO whatever the number of particles (particles only repeat the same draw); for a bound tighter "
        "over them, IWAELoss(global_particles=M) for training, nested_bound or iwae_bound(..., global_particles=M) "
        "to score, draw M of them (full batch only)",
    )


def warn_outer_plate(warned, global_particles, names, error):
    """Warns once that the programs failed under the outer plate of ``global_particles`` draws of
    the globals ``names`` with ``error``, so that the draws are taken one call each."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warn_once(
        warned,
        "outer-plate",
        f"the model or guide does not run with {global_particles} draws of the globals "
        f"({', '.join(repr(n) for n in names)}) in one outer plate, their leading batch dim "
        f"({type(error).__name__}: {message}): the {global_particles} draws are taken one call each, "
        f"{global_particles} times the time of one (a model whose globals broadcast over a leading dim, "
        "e.g. torch.matmul in place of nn.Linear, takes one pass)",
    )
