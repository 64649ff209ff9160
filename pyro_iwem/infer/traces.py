"""The trace machinery under its former module name, kept so that imports keep working.

It now lives in :mod:`~pyro_iwem.infer.sampler` (the sampler),
:mod:`~pyro_iwem.infer.particles` (one draw), :mod:`~pyro_iwem.infer.sites` (what each
site feeds), :mod:`~pyro_iwem.infer.plates`, :mod:`~pyro_iwem.infer.checks` and
:mod:`~pyro_iwem.infer.transforms`.
"""

from .particles import Particles
from .plates import PARTICLE_PLATE
from .sampler import ParticleSampler, guess_max_plate_nesting
from .sites import density_sites, is_auxiliary, is_missing_entries, param_values

__all__ = [
    "PARTICLE_PLATE",
    "ParticleSampler",
    "Particles",
    "density_sites",
    "guess_max_plate_nesting",
    "is_auxiliary",
    "is_missing_entries",
    "param_values",
]
