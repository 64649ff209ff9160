r"""The proposal's inputs for data with missing entries (§4 of the paper).

A model observes ``x`` with a mask through :func:`~pyro_iwem.infer.masked.observe_masked`
(or Pyro's ``obs_mask=``), so its missing entries :math:`x_m` form a latent site the model
proposes itself. What remains is what the guide sees in place of the incomplete ``x``:

* :class:`ZeroFilledInputs`: :math:`\tilde x_0 = (x_o, 0)`, the proposal
  :math:`q(z \mid x_o, 0)` of missIWAE (Mattei & Frellsen 2018);
* :class:`ImputedInputs`: :math:`\breve x = (x_o, \breve x_m)` with
  :math:`\breve z \sim q(z \mid \tilde x_0)` and :math:`\breve x_m \sim p(x_m \mid \breve z; \theta)`,
  the proposal :math:`p(x_m \mid z; \theta)\, q(z \mid \breve x; \phi)` of miss-IWEM (§4.1).

Either is passed as ``IWEM(..., guide_inputs=...)`` or to a loss; the importance weight is then
:math:`p(x_o, z) / q(z \mid \cdot)`, the model-proposed :math:`x_m` cancelling, and IWEM's
E-step and optimal P-step use the full :math:`\log p(x_o, x_m, z)` (eqs. 9 and 10).
"""

import torch
from pyro import poutine


class ZeroFilledInputs:
    r"""The guide sees :math:`\tilde x_0 = (x_o, 0)`: missing entries of the data set to zero.

    :param data: position (int) or keyword (str) of the data among the model's arguments.
    :param mask: position or keyword of the bool mask, True where observed.
    """

    def __init__(self, data=0, mask=1):
        self.data = data
        self.mask = mask

    def _get(self, args, kwargs, key):
        try:
            return args[key] if isinstance(key, int) else kwargs[key]
        except (IndexError, KeyError):
            raise ValueError(f"{type(self).__name__}: the model was not called with argument {key!r}") from None

    def _with(self, args, kwargs, value):
        if isinstance(self.data, int):
            return args[: self.data] + (value,) + args[self.data + 1 :], kwargs
        return args, {**kwargs, self.data: value}

    def zero_filled(self, args, kwargs):
        x, mask = self._get(args, kwargs, self.data), self._get(args, kwargs, self.mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"{type(self).__name__}: the mask {self.mask!r} must be a bool tensor, got {mask.dtype}")
        if mask.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}: the mask {self.mask!r} has shape {tuple(mask.shape)}, but the data "
                f"{self.data!r} has shape {tuple(x.shape)}; give one entry of the mask per entry of the data"
            )
        return x, mask, torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def __call__(self, model, guide, args, kwargs):
        _, _, x0 = self.zero_filled(args, kwargs)
        return self._with(args, kwargs, x0)


class ImputedInputs(ZeroFilledInputs):
    r"""The guide sees :math:`\breve x = (x_o, \breve x_m)`, miss-IWEM's completion (§4.1).

    Once per call and per datum (:class:`~pyro_iwem.infer.IWEM` calls it once per step, for both
    its E- and P-step): :math:`\breve z \sim q(z \mid \tilde x_0; \phi)`, then
    :math:`\breve x_m \sim p(x_m \mid \breve z; \theta)` from the model's latent site
    ``"{site}_unobserved"`` (as :func:`~pyro_iwem.infer.masked.observe_masked` and Pyro's
    ``obs_mask=`` name it), drawn without gradients: the completion is an input of the proposal.

    :param str site: the observed site's name.
    """

    def __init__(self, site="x", data=0, mask=1):
        super().__init__(data, mask)
        self.site = site

    def __call__(self, model, guide, args, kwargs):
        x, mask, x0 = self.zero_filled(args, kwargs)
        if mask.all():  # nothing to impute: the proposal is IWEM's q(z | x)
            return args, kwargs
        args0, kwargs0 = self._with(args, kwargs, x0)
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args0, **kwargs0)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args0, **kwargs0)
        name = f"{self.site}_unobserved"
        if name not in model_trace.nodes:
            raise ValueError(
                f"ImputedInputs: the model has no site '{name}'; observe '{self.site}' with obs_mask= or "
                "pyro_iwem.observe_masked, or name the observed site with site="
            )
        return self._with(args, kwargs, torch.where(mask, x, model_trace.nodes[name]["value"]))
