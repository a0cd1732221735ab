"""The shipped models as a diffusers pipeline: diffusers' own DPM-Solver++ scheduler, the project's timesteps and
guidance interval, the same images as nbutils.pipeline.sample."""

import pytest
import torch

from nbutils.config import checkpoints_dir
from nbutils.pipeline import SamplingRecipe, load_pipeline, sample

pytest.importorskip("diffusers", reason="the diffusers pipeline is an optional extra")
from nbutils.hf_pipeline import FashionLatentDiffusionPipeline, to_diffusers  # noqa: E402

TOLERANCE = 1e-4  # largest |difference| of a pixel in [0, 1] between the two pipelines (float32 round-off)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(checkpoints_dir(), device="cpu")


def test_diffusers_pipeline_gives_the_images_of_nbutils_sample(pipe):
    labels = torch.tensor([0, 5, 7, 9])
    hf = to_diffusers(pipe)  # the shipped recipe: DPM-Solver++ on its listed steps, guidance on an interval
    assert isinstance(hf, FashionLatentDiffusionPipeline)
    assert type(hf.scheduler).__name__ == "DPMSolverMultistepScheduler"
    ours = sample(pipe, len(labels), labels, None, torch.Generator().manual_seed(0))
    theirs = hf(class_labels=labels, generator=torch.Generator().manual_seed(0)).images
    assert hf.scheduler.timesteps.tolist()[: len(hf.default_timesteps)] == hf.default_timesteps
    assert (theirs - ((ours.images + 1) / 2).clamp(0, 1)).abs().max() < TOLERANCE


def test_diffusers_pipeline_refuses_what_it_cannot_run(pipe):
    with pytest.raises(ValueError, match="deterministic samplers"):
        to_diffusers(pipe, SamplingRecipe(sampler="ddpm"))
    # DDIMScheduler spaces its steps from t = 999; this cosine model's trailing steps start at its top timestep
    with pytest.raises(ValueError, match="cannot step through"):
        to_diffusers(pipe, SamplingRecipe(sampler="ddim", steps=20))
    with pytest.raises(ValueError, match="class_labels"):
        to_diffusers(pipe)(class_labels=[10])
