"""The evaluation's chunks: 500 particles where the memory budget allows, fewer where it does not.

The chunk size decides how the random numbers fall on the particles (torch's normal sampler
draws a tensor in blocks), so a score is reproducible only for a fixed chunk size: the scores
recorded so far were drawn in chunks of 500, and a budget that fits them must not change them.
"""

import pyro
import torch

from pyro_iwem.experiments.evaluate import EVAL_CHUNK, eval_chunk_size, mean_log_likelihood
from pyro_iwem.infer import iwae_bound
from pyro_iwem.infer.evaluation import peak_memory
from pyro_iwem.infer.sampler import ParticleSampler
from pyro_iwem.models import MLPVAE


class Batches:
    """Two batches of four binary 12-pixel images (what ``mean_log_likelihood`` reads of a data set)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(8, 12, generator=g) < 0.4).float()

    def batches(self, split, batch_size, device=None):
        return [self.x[i : i + batch_size] for i in range(0, len(self.x), batch_size)]


def _model():
    torch.manual_seed(1)
    return MLPVAE(x_dim=12, z_dim=3, hidden=(8,))


def test_a_budget_that_fits_500_particles_changes_no_score():
    """Chunks of 500 as before, and the probe that measures them leaves the random stream alone."""
    vae, data = _model(), Batches()
    assert eval_chunk_size(vae, data.x[:4], memory_budget=2**30) == EVAL_CHUNK
    pyro.set_rng_seed(5)
    score = mean_log_likelihood(vae, data, "test", 1200, batch_size=4)
    pyro.set_rng_seed(5)
    sampler = ParticleSampler(vae.model, vae.guide, max_plate_nesting=1)
    by_hand = [iwae_bound(vae.model, vae.guide, x, num_particles=1200, chunk_size=500, sampler=sampler) for x in data.batches("test", 4)]
    assert score == torch.cat(by_hand).mean().item()
    pyro.set_rng_seed(6)
    assert mean_log_likelihood(vae, data, "test", 1200, batch_size=4) != score  # the seed does matter


def test_a_small_budget_cuts_the_chunks_and_keeps_their_peak_under_it():
    vae, data = _model(), Batches()
    x = data.x[:4]
    sampler = ParticleSampler(vae.model, vae.guide, max_plate_nesting=1)
    with torch.no_grad():
        per_particle = peak_memory(lambda: sampler(400, (x,), {}, grad_guide=False))[0] / 400
        budget = int(per_particle * 60)
        chunk = eval_chunk_size(vae, x, memory_budget=budget)
        assert 30 <= chunk <= 60, chunk
        peak, _ = peak_memory(lambda: sampler(chunk, (x,), {}, grad_guide=False))
    assert peak <= budget
    score = mean_log_likelihood(vae, data, "test", 300, batch_size=4, memory_budget=budget)
    exact_enough = mean_log_likelihood(vae, data, "test", 300, batch_size=4)
    assert abs(score - exact_enough) < 0.5  # the same bound, other draws


def test_particles_drawn_one_at_a_time_probe_the_budget_with_one():
    """With vectorize_particles=False a chunk's particles are all held until they are stacked, so
    the probe that sizes the chunks draws one particle, not 16 (issue 21, item 5): no chunk, the
    probe included, goes over the budget."""
    vae, data = _model(), Batches()
    x = data.x[:4]
    sampler = ParticleSampler(vae.model, vae.guide, max_plate_nesting=1, vectorize_particles=False)
    with torch.no_grad():
        per_particle = peak_memory(lambda: sampler(8, (x,), {}, grad_guide=False))[0] / 8
    budget = int(per_particle * 3)
    drawn = []
    call = sampler.__call__

    class Counting:
        vectorize_particles = False

        def __call__(self, n, *args, **kwargs):
            drawn.append(n)
            return call(n, *args, **kwargs)

        draws = ParticleSampler.draws  # one draw of β: a counted call

        def __getattr__(self, name):
            return getattr(sampler, name)

    bound = iwae_bound(vae.model, vae.guide, x, num_particles=20, memory_budget=budget, sampler=Counting())
    assert drawn[0] == 1 and max(drawn) <= 4 and sum(drawn) == 20, drawn
    assert torch.isfinite(bound).all()
