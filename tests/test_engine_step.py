"""The training step's speed options leave the numbers alone: compile, AMP, channels_last, per-pair decoders;
and the step reads nothing back from the device."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.engine.config import DataConfig, OptimConfig, StepConfig, TrainConfig
from cmvae_engine.engine.profiling import count_syncs
from cmvae_engine.engine.step import TrainStep, build_optimizer, prepare_model, resolve_options
from cmvae_engine.engine.tasks.cmvae_task import CMVAEObjective, CMVAETask
from cmvae_engine.engine.trainer import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # M=2: a cold CPU compile builds one C++ file per fused kernel (~2 s of g++ each here); M=3 has ~50% more.
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd2", n_modalities=2, n_train=64, n_valid=16,
                            n_test=32, seed=0)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One inductor cache for the session's compile tests (the bench test compiles the same graphs)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
    yield
    mp.undo()


def config(data, out, **step) -> TrainConfig:
    step.setdefault("amp", False)  # fp32 unless a test says otherwise (the default is bf16 on AMX CPUs)
    return TrainConfig(model=ModelConfig(n_clusters=4, z_dim=8, w_dim=4, width=0.0625),
                       data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=3, batch_size=32),
                       step=StepConfig(**step), out=str(out), log_every=1, eval_every=0, seed=3)


def losses(out) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out) -> torch.Tensor:
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return torch.cat([v.flatten().float() for v in state.values()])


def test_compiled_step_gives_the_eager_loss_curve(data, tmp_path, inductor_cache):
    # fp32 tolerance: 1e-5 relative on each epoch's loss (measured: <= 4e-8); parameters after 6 Adam steps within
    # 1e-4 (measured: 1e-6 at M=3, 1.1e-5 at M=2; Adam's early steps move each weight by ~lr = 1e-3 whatever the
    # gradient's size, so a rounding-level gradient difference on a near-zero gradient shows up at that scale).
    # fallback_random makes inductor draw the same random numbers as eager; without it the compiled step
    # samples from the same distributions with other numbers.
    eager = train(config(data, tmp_path / "eager"))
    with torch._inductor.config.patch(fallback_random=True):
        compiled = train(config(data, tmp_path / "compiled", compile=True))
    assert compiled["step"] == eager["step"] == 6
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    a, b = final_params(tmp_path / "eager"), final_params(tmp_path / "compiled")
    assert (a - b).abs().max() <= 1e-4


def test_bf16_autocast_and_channels_last_keep_the_curve(data, tmp_path):
    # bf16 on CPU is the same autocast as on CUDA (networks in bf16, the probabilistic core in fp32): epoch
    # losses within 1e-3 (measured: <= 6.1e-5); channels_last within fp32 rounding, 1e-5 (measured: equal).
    train(config(data, tmp_path / "ref"))
    train(config(data, tmp_path / "bf16", amp=True))
    ref = losses(tmp_path / "ref")
    train(config(data, tmp_path / "cl", channels_last=True))
    assert losses(tmp_path / "bf16") == pytest.approx(ref, rel=1e-3)
    assert losses(tmp_path / "bf16") != pytest.approx(ref, rel=1e-7)  # it did run in bf16
    assert losses(tmp_path / "cl") == pytest.approx(ref, rel=1e-5)


def _short_run(**step) -> tuple[list[float], TrainStep]:
    torch.manual_seed(0)
    model = CMVAE(ModelConfig(n_modalities=2, n_clusters=3, z_dim=4, w_dim=4, width=0.0625))
    opts = resolve_options(StepConfig(**step), CPU)
    prepare_model(model, CMVAETask().networks(model), opts, CPU)
    opt = build_optimizer([{"params": list(model.parameters())}], 1e-3, True, opts)
    st = TrainStep(CMVAEObjective(model, "iwae", 1), opt, opts, CPU)
    xb = torch.randint(0, 256, (2, 8, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = []
    for i in range(4):
        st.stats.reset()
        st(xb, i + 1, {"beta": 2.5})
        out.append(st.stats.loss.item() / st.stats.n)
    return out, st


def test_fp16_with_grad_scaler_takes_every_step():
    ref, _ = _short_run(amp=False)
    fp16, st = _short_run(amp=True, amp_dtype="fp16")
    assert st.scaler is not None and st.scaler.get_scale() == 1.0  # no overflow, so no skipped step
    assert fp16 == pytest.approx(ref, rel=1e-3)  # measured: 1.8e-5
    assert fp16[-1] < fp16[0]  # it trained


def test_per_pair_decoders_equal_batched(rng):
    torch.manual_seed(0)
    model = CMVAE(ModelConfig(n_modalities=3, n_clusters=4, z_dim=8, w_dim=4, width=0.0625))
    x = torch.rand(3, 5, 3, 28, 28, generator=rng)
    lat = model.sample_latents(model.encode(x), n_samples=2, generator=rng)
    batched = model.decode_all(lat)
    per_pair = model.decode_all(lat, per_pair=True)
    for a, b in zip(batched, per_pair, strict=True):
        assert a.shape == b.shape == (3, 2, 5, 3, 28, 28)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.decode_per_pair = True  # what the baseline sets; loss_fn picks it up
    torch.testing.assert_close(model.decode_all(lat)[1], per_pair[1])


def test_step_reads_nothing_from_the_device():
    torch.manual_seed(0)
    model = CMVAE(ModelConfig(n_modalities=2, n_clusters=3, z_dim=4, w_dim=4, width=0.0625))
    opts = resolve_options(StepConfig(amp=False), CPU)
    prepare_model(model, CMVAETask().networks(model), opts, CPU, annotate=True)
    opt = build_optimizer([{"params": list(model.parameters())}], 1e-3, True, opts)
    step = TrainStep(CMVAEObjective(model, "iwae", 1), opt, opts, CPU, annotate=True)
    xb = torch.randint(0, 256, (2, 8, 3, 28, 28), dtype=torch.uint8)
    step(xb, 1, {"beta": 2.5})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, 5):
            step(xb, i, {"beta": 2.5})
    assert count_syncs(prof.events(), cuda=False)[0] == 0  # Adam's own host-side counters are not device reads
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.stats.loss.item()  # what a log interval does: counted
    assert count_syncs(prof.events(), cuda=False)[0] == 1
    assert step.stats.n == 4 * 8 and int(step.stats.first_bad) == -1
    step(xb, 5, {"beta": float("nan")})  # a NaN beta poisons the loss of step 5: recorded on the device
    assert int(step.stats.first_bad) == 5


def test_options_are_checked():
    with pytest.raises(ValueError, match="--cuda-graphs"):
        StepConfig(cuda_graphs=True)
    with pytest.raises(ValueError, match="--amp-dtype"):
        StepConfig(amp_dtype="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_options(StepConfig(compile=True, cuda_graphs=True), CPU)
    opts = resolve_options(StepConfig(), CPU)
    assert opts.channels_last and not opts.fused_adam  # CPU defaults (NHWC: faster)


@pytest.mark.parametrize("amx", [False, True])
def test_amp_default_follows_the_cpu_matrix_units(monkeypatch, amx):
    # bf16 autocast by default only on CPUs with AMX (faster there, emulated and slower elsewhere); CUDA always;
    # fp16 never by default on CPU; an explicit --amp/--no-amp wins everywhere.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_options(StepConfig(), CPU).amp_dtype == (torch.bfloat16 if amx else None)
    assert resolve_options(StepConfig(amp_dtype="fp16"), CPU).amp_dtype is None
    assert resolve_options(StepConfig(), torch.device("cuda")).amp_dtype == torch.bfloat16
    assert resolve_options(StepConfig(amp=False), torch.device("cuda")).amp_dtype is None
    assert resolve_options(StepConfig(amp=True), CPU).amp_dtype == torch.bfloat16
    assert resolve_options(StepConfig(amp=False), CPU).amp_dtype is None
