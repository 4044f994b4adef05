"""The samplers against the released implementation's own numbers (shared/golden, tiny weights).

Teacher-forced tests replay the recorded velocities through our samplers (so they test the
schedules, the update rules, the RNG order and diffusers' UniPC without the model); end-to-end
tests run `MagiHumanDiT` with the golden weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from magitrain.flow import (
    Guidance,
    distill_step,
    flow_grid,
    initial_latents,
    sample_base,
    sample_distilled,
    sample_super_resolution,
    sr_renoise_coefficient,
    unipc_scheduler,
    upsample_latent,
    zero_snr_alphas_sqrt,
)
from magitrain.model import MagiHumanDiT, golden_tiny

try:
    from magitrain.checkpoint import load_official
except ImportError:  # the loader is optional here: the golden file holds plain official names
    load_official = None

SEED = 42
SR_CONFIG = dict(local_attn_layers=(0, 1, 2, 4, 5, 6), frame_window=1, coords_style="v1")


def _max_abs(out, ref) -> float:
    return (out - ref).abs().max().item()


def _rms_rel(out, ref) -> float:
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.fixture(scope="module")
def schedules(golden_dir):
    return load_file(golden_dir / "sampler_schedules.safetensors")


@pytest.fixture(scope="module")
def base32(golden_dir):
    return load_file(golden_dir / "pipeline_base32_sr5.safetensors")


def _load_model(golden_dir, **overrides) -> MagiHumanDiT:
    model = MagiHumanDiT(golden_tiny(**overrides))
    path = golden_dir / "weights_tiny.safetensors"
    if load_official is not None:
        return load_official(model, path).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def base_model(golden_dir):
    return _load_model(golden_dir)


@pytest.fixture(scope="module")
def sr_model(golden_dir):
    return _load_model(golden_dir, **SR_CONFIG)


def _native(model):
    """The model under bf16 autocast: the released (native) numerics."""

    def velocity_fn(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args)

    return velocity_fn


class Replay:
    """A velocity_fn returning recorded velocities, per prompt, in call order; it keeps its inputs."""

    def __init__(self, *recordings):  # (text tensor, [(v_video, v_audio), ...]) per prompt
        self.recordings = recordings
        self.calls = {id(text): 0 for text, _ in recordings}
        self.inputs = []

    def __call__(self, video, audio, text, text_len):
        self.inputs.append((video.clone(), audio.clone()))
        outputs = next(out for t, out in self.recordings if t is text)
        self.calls[id(text)] += 1
        return outputs[self.calls[id(text)] - 1]


def _text(fx, null=False):
    suffix = "_null" if null else ""
    return fx[f"text.context{suffix}"], fx[f"text.context{suffix}_len"].reshape(1)


# ---- grids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [8, 5, 32])
def test_grids_equal_released(schedules, steps):
    timesteps, sigmas = flow_grid(steps)
    ref_t, ref_s = schedules[f"unipc_shift5_n{steps}.timesteps"], schedules[f"unipc_shift5_n{steps}.sigmas"]
    assert timesteps.dtype == torch.int64 and torch.equal(timesteps, ref_t)
    assert sigmas.dtype == torch.float32 and _max_abs(sigmas, ref_s) <= 1e-7
    solver = unipc_scheduler(steps)  # diffusers' own grid is the same
    assert torch.equal(solver.timesteps, ref_t) and _max_abs(solver.sigmas, ref_s) <= 1e-7


def test_zero_snr_table_and_sr_coefficient(schedules):
    assert _max_abs(zero_snr_alphas_sqrt(), schedules["zerosnr.sigmas_1000_flip"]) <= 1e-7
    a = sr_renoise_coefficient(220)
    assert abs(a.item() - schedules["zerosnr.sigma_at_220"].item()) <= 1e-7
    assert abs((1 - a**2).sqrt().item() - schedules["zerosnr.noise_coef_at_220"].item()) <= 1e-7
    assert round(a.item(), 4) == 0.8389


def test_guidance_schedule_equals_released(base32):
    timesteps, _ = flow_grid(32)
    scales = torch.tensor([Guidance().video(int(t)) for t in timesteps])
    assert torch.equal(scales, base32["base.video_guidance_scale_per_step"])


# ---- distilled 8-step sampler --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pipeline_distill8_fp32", "pipeline_distill8"])
def test_distill_step_teacher_forced(golden_dir, name):
    fx = load_file(golden_dir / f"{name}.safetensors")
    _, sigmas = flow_grid(8)
    assert _max_abs(sigmas, fx["schedule.sigmas"]) <= 1e-7
    for i in range(8):
        for m in ("video", "audio"):
            out = distill_step(
                fx[f"step{i}.latent_{m}_in"], fx[f"step{i}.v_{m}"], sigmas[i], sigmas[i + 1], fx[f"step{i}.noise_{m}"]
            )
            assert _max_abs(out, fx[f"step{i}.latent_{m}_out"]) <= 1e-6


def test_distill_sampler_replayed_reproduces_rng_and_steps(golden_dir):
    fx = load_file(golden_dir / "pipeline_distill8_fp32.safetensors")
    generator = torch.Generator().manual_seed(SEED)
    video, audio = initial_latents((1, 48, 3, 4, 6), (1, 9, 64), generator)
    assert torch.equal(video, fx["init.video_latent"]) and torch.equal(audio, fx["init.audio_latent"])
    text, text_len = _text(fx)
    replay = Replay((text, [(fx[f"step{i}.v_video"], fx[f"step{i}.v_audio"]) for i in range(8)]))
    video, audio = sample_distilled(replay, video, audio, text, text_len, generator=generator)
    for i, (v_in, a_in) in enumerate(replay.inputs):
        assert _max_abs(v_in, fx[f"step{i}.latent_video_in"]) <= 1e-6
        assert _max_abs(a_in, fx[f"step{i}.latent_audio_in"]) <= 1e-6
    assert _max_abs(video, fx["final.video_latent"]) <= 1e-6
    assert _max_abs(audio, fx["final.audio_latent"]) <= 1e-6


def _run_distill(fx, velocity_fn):
    generator = torch.Generator().manual_seed(SEED)
    video, audio = initial_latents(fx["init.video_latent"].shape, fx["init.audio_latent"].shape, generator)
    return sample_distilled(velocity_fn, video, audio, *_text(fx), generator=generator)


def test_distill8_fp32_end_to_end(golden_dir, base_model):
    fx = load_file(golden_dir / "pipeline_distill8_fp32.safetensors")
    video, audio = _run_distill(fx, base_model)
    assert _max_abs(video, fx["final.video_latent"]) <= 5e-5
    assert _max_abs(audio, fx["final.audio_latent"]) <= 5e-5


def test_distill8_native_end_to_end(golden_dir, base_model):
    fx = load_file(golden_dir / "pipeline_distill8.safetensors")
    video, audio = _run_distill(fx, _native(base_model))
    assert _rms_rel(video, fx["final.video_latent"]) <= 5e-2
    assert _rms_rel(audio, fx["final.audio_latent"]) <= 5e-2
