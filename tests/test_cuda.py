"""The CUDA path on a real GPU: training with bf16 autocast through ``rnn_models.training.fit``,
plain-file models that a CPU-only process loads and that forecast / write the same there, no
host-to-device copy per batch, and (where Prefect and MLflow are installed) both flows and
the registry. Skipped, saying why, where there is no CUDA device; ``scripts/gpu-check.sh``
runs them on a GPU machine, which may have PyTorch alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rnn_models.forecasting import ForecastPipeline, mse_objective
from rnn_models.generation import complete
from rnn_models.panel import Panel, PanelWindows, encoded_batches
from rnn_models.recurrent import CharLM, CharLMConfig, Forecaster, ForecasterConfig, Recurrent, RecurrentConfig
from rnn_models.text import LanguageModelLoss, Vocab, normalize, random_batches, save_charlm, sequential_batches
from rnn_models.training import TrainConfig, autocast, fit, resolve_device, tensor_batches
from rnn_models.transforms import Chain, Scale, WindowNorm
from rnn_models.windows import make_windows, window_origins

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() "
                                 "is False (scripts/gpu-check.sh runs these on a GPU machine)")]

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tasks" / "corpora" / "timemachine.txt"
PROMPT = "the time traveller "
TOLERANCE = 0.05  # bf16 has 8 bits of mantissa: ~0.4 % per rounding, a few percent after a network's worth


def on_cpu_only(code: str) -> None:
    """Run ``code`` in a fresh Python process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    prelude = "import torch\nassert not torch.cuda.is_available(), 'the CPU-only process sees a GPU'\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"CPU-only process failed:\n{proc.stderr[-4000:]}"


# The CPU-side check of a greedy continuation written on the GPU: along the GPU's text the
# CPU model picks the same character at every step, except where its own two best
# characters are closer than bf16 rounding can tell apart. Defines greedy_report(model, vocab, text).
GREEDY_CHECK = f"""
import torch
def greedy_report(model, vocab, text, prompt={PROMPT!r}):
    ids = torch.tensor(vocab.encode(text))
    with torch.no_grad():
        logits = model(ids[None])[0][0].float()  # (T, V)
    disagree = []
    for i in range(len(prompt) - 1, len(ids) - 1):
        best = int(logits[i].argmax())
        if best != int(ids[i + 1]):
            disagree.append(float(logits[i, best] - logits[i, ids[i + 1]]))
    return {{"steps": len(ids) - len(prompt), "disagree": disagree}}
"""


def assert_same_greedy(report: dict) -> None:
    assert report["steps"] > 0
    close_calls = [m for m in report["disagree"] if m <= TOLERANCE]
    assert len(close_calls) == len(report["disagree"]), f"CPU and GPU choose differently: margins {report['disagree']}"


def test_auto_device_picks_cuda():
    assert resolve_device("auto") == "cuda"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_recurrence_runs_in_float32_under_autocast(cell):
    """Bare CUDA autocast runs cuDNN's RNNs in float16, with no loss scaling; rnnflow's do not."""
    net = Recurrent(RecurrentConfig(cell=cell, input_size=4, hidden_size=8)).to("cuda")
    x = torch.randn(2, 5, 4, device="cuda")
    with autocast("cuda"):
        assert net.rnn(x)[0].dtype == torch.float16  # what the guard is for: if this changes, revisit it
        out, _ = net(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------- forecaster


def _sine(n=1500, period=24):
    t = np.arange(n)
    return 50 + 10 * np.sin(2 * np.pi * t / period) + np.random.default_rng(0).normal(0, 0.3, n)


def test_forecaster_trained_on_cuda_forecasts_the_same_on_a_cpu_only_machine(tmp_path):
    y, L, H = _sine(), 48, 12
    chain = Chain([Scale()]).fit(y[:1000, None])
    raw = {part: make_windows(y[:, None], y, window_origins(lo, hi, L, H), L, H, dtype=np.float64)
           for part, (lo, hi) in {"train": (0, 1000), "val": (1000, 1250), "test": (1250, 1500)}.items()}
    (x_tr, y_tr), (x_va, y_va) = [[torch.from_numpy(a.astype(np.float32)).cuda() for a in chain.encode(*raw[p])[:2]]
                                  for p in ("train", "val")]
    dtypes = set()

    def objective(model, batch):  # mse_objective, recording the dtype autocast gave the output
        out = model(batch[0])
        dtypes.add(out.dtype)
        return torch.nn.functional.mse_loss(out.float(), batch[1]), len(batch[0])

    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(hidden_size=64, horizon=H)).to("cuda")
    result = fit(model, lambda g: tensor_batches(x_tr, y_tr, batch_size=32, generator=g),
                 lambda: tensor_batches(x_va, y_va, batch_size=4096), objective,
                 TrainConfig(epochs=8, lr=3e-3, patience=0, ema=0.98, device="cuda", progress=False))
    assert dtypes == {torch.bfloat16}  # trained under bf16 autocast
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    assert result.best_val_loss < 0.2 * result.history[0].train_loss  # it learned the sine

    pipe = ForecastPipeline([model], chain, {"lookback": L})
    x_test, y_test = raw["test"]
    on_gpu = pipe.predict(x_test)
    assert np.abs(on_gpu - y_test).mean() < 1.5  # amplitude 10, noise 0.3
    paths = pipe.save(tmp_path / "model")
    np.save(tmp_path / "x.npy", x_test)
    on_cpu_only(f"""
        import numpy as np
        from rnn_models.forecasting import ForecastPipeline, mse_objective
        pipe = ForecastPipeline.load({paths['weights']!r}, {paths['config']!r})
        assert all(p.device.type == "cpu" for p in pipe.members.parameters())
        np.save({str(tmp_path / 'cpu.npy')!r}, pipe.predict(np.load({str(tmp_path / 'x.npy')!r})))
    """)
    on_cpu = np.load(tmp_path / "cpu.npy")
    assert on_cpu.shape == on_gpu.shape
    np.testing.assert_allclose(on_cpu, on_gpu, rtol=0, atol=TOLERANCE * np.abs(y_test - y_test.mean()).max())


# ---------------------------------------------------------------- character LM


def _corpus(n=60_000):
    text = normalize(CORPUS.read_text(encoding="utf-8")[:n], lower=True)
    vocab = Vocab.build(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return vocab, ids[:cut], ids[cut:]


def test_charlm_trained_on_cuda_writes_the_same_greedy_text_on_a_cpu_only_machine(tmp_path):
    vocab, train, val = _corpus()
    train, val = train.cuda(), val.cuda()
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(hidden_size=256, vocab_size=len(vocab), embedding_dim=32)).to("cuda")
    result = fit(model, lambda g: sequential_batches(train, 32, 35, g), lambda: sequential_batches(val, 32, 35),
                 LanguageModelLoss(carry_state=True),
                 TrainConfig(epochs=6, lr=3e-3, patience=0, device="cuda", progress=False))
    assert result.best_val_loss < 2.3  # well below uniform over ~30 characters (3.4 nats)
    model.eval()
    text = complete(model, vocab, PROMPT, 100, temperature=0)
    paths = save_charlm(model, vocab, tmp_path / "lm", {})
    on_cpu_only(f"""
        import json
        from rnn_models.generation import complete
        from rnn_models.text import load_charlm
        {textwrap.indent(GREEDY_CHECK, ' ' * 8).strip()}
        model, vocab, _ = load_charlm({paths['weights']!r}, {paths['vocab']!r}, {paths['config']!r})
        report = greedy_report(model, vocab, {text!r})
        report["own"] = complete(model, vocab, {PROMPT!r}, 100, temperature=0)
        open({str(tmp_path / 'report.json')!r}, "w").write(json.dumps(report))
    """)
    report = json.loads((tmp_path / "report.json").read_text())
    assert_same_greedy(report)
    if not report["disagree"]:
        assert report["own"] == text


# ---------------------------------------------------------------- no copy per batch


def count_host_to_device(fn) -> int:
    """Host-to-device memory copies the CUDA profiler sees while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum("HtoD" in e.name for e in prof.events())


def test_the_profiler_counts_host_to_device_copies():
    """The control for the test below: a copy per batch is seen, so its absence means something."""
    x = torch.randn(64, 8)
    assert count_host_to_device(lambda: [x.to("cuda") for _ in range(20)]) >= 20


def _case(name: str):
    """(model, train batches, validation batches, objective, number of training batches)."""
    if name == "forecaster":
        x, y = torch.randn(3200, 24, 1, device="cuda"), torch.randn(3200, 4, device="cuda")
        return (Forecaster(ForecasterConfig(hidden_size=32, horizon=4)),
                lambda g: tensor_batches(x, y, batch_size=32, generator=g),
                lambda: tensor_batches(x[:256], y[:256], batch_size=4096), None, 100)
    if name == "panel":
        panel = Panel.from_series([np.sin(np.arange(400) / 3.0) * (i + 1) for i in range(20)], device="cuda")
        train = PanelWindows(panel, 24, 4, np.zeros(20, int), np.full(20, 300))
        val = PanelWindows(panel, 24, 4, np.full(20, 300), np.full(20, 400))
        chain = Chain([WindowNorm("last")])
        return (Forecaster(ForecasterConfig(hidden_size=32, horizon=4, patch=4)),
                lambda g: encoded_batches(train, chain, 64, g), lambda: encoded_batches(val, chain, 4096), None,
                -(-len(train) // 64))
    vocab, train, val = _corpus(40_000)
    train, val = train.cuda(), val.cuda()
    sampler = random_batches if name == "charlm-random" else sequential_batches
    n = (len(train) - 1) // (16 * 20) if name == "charlm-random" else (len(train) - 1) // 16 // 20
    return (CharLM(CharLMConfig(hidden_size=64, vocab_size=len(vocab), embedding_dim=16)),
            lambda g: sampler(train, 16, 20, g), lambda: sequential_batches(val, 16, 20),
            LanguageModelLoss(carry_state=name == "charlm-sequential"), n)


@pytest.mark.parametrize("name", ["forecaster", "panel", "charlm-sequential", "charlm-random"])
def test_data_stays_on_the_device_no_copy_per_batch(name):
    model, train, val, objective, n_batches = _case(name)
    model = model.to("cuda")
    objective = objective or mse_objective

    def copies(epochs: int) -> int:
        cfg = TrainConfig(epochs=epochs, patience=0, ema=0.98, device="cuda", progress=False)
        return count_host_to_device(lambda: fit(model, train, val, objective, cfg))

    copies(1)  # warm-up: cuDNN plans, allocator, lazy inits
    one, three = copies(1), copies(3)
    assert n_batches >= 40
    # a fit starts with a few (the optimizer's step counters); an epoch adds its shuffled order at most
    assert (three - one) / 2 <= 1, f"{three - one} host-to-device copies in 2 epochs of {n_batches} batches"
    assert one <= len(list(model.parameters())) + 2, f"{one} host-to-device copies in one epoch"


# ---------------------------------------------------------------- flows and registry


@pytest.fixture
def flows_and_registry():
    pytest.importorskip("prefect", reason="Prefect is not installed here: the flows' CUDA path is not checked")
    pytest.importorskip("mlflow", reason="MLflow is not installed here: the registry's CUDA path is not checked")


def test_timeseries_flow_trains_on_cuda_and_its_registered_model_loads_on_cpu(flows_and_registry, mlflow_store,
                                                                              tmp_path):
    import mlflow

    from flows.timeseries import timeseries_flow

    result = timeseries_flow(length=800, lookback=24, horizon=6, epochs=4, device="auto")
    assert result["device"] == "cuda" and result["promoted"]
    history = pd.DataFrame({"value": np.sin(2 * np.pi * np.arange(48) / 50)})
    history.to_csv(tmp_path / "history.csv", index=False)
    on_cpu_only(f"""
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({result['model_uri']!r})
        model.predict(pd.read_csv({str(tmp_path / 'history.csv')!r})).to_csv({str(tmp_path / 'cpu.csv')!r}, index=False)
    """)
    on_cpu = pd.read_csv(tmp_path / "cpu.csv")
    pipeline = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model().pipeline
    pipeline.members.to("cuda")
    on_gpu = pipeline.predict(history[["value"]].to_numpy()[-pipeline.lookback:][None])[0]
    np.testing.assert_allclose(on_cpu["forecast"].to_numpy(), on_gpu, rtol=0, atol=TOLERANCE)


def test_charlm_flow_trains_on_cuda_and_its_registered_model_writes_the_same_on_cpu(flows_and_registry,
                                                                                    mlflow_store, tmp_path):
    import mlflow

    from flows.charlm import charlm_flow

    corpus = tmp_path / "timemachine.txt"
    corpus.write_text(CORPUS.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    result = charlm_flow(data=str(corpus), epochs=3, sample_every=0, sample_chars=20, device="auto")
    assert result["device"] == "cuda" and result["promoted"]
    lm = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model()
    lm.model.to("cuda")
    text = complete(lm.model, lm.vocab, PROMPT, 80, temperature=0)
    on_cpu_only(f"""
        import json, mlflow
        {textwrap.indent(GREEDY_CHECK, ' ' * 8).strip()}
        lm = mlflow.pyfunc.load_model({result['model_uri']!r}).unwrap_python_model()
        open({str(tmp_path / 'report.json')!r}, "w").write(json.dumps(greedy_report(lm.model, lm.vocab, {text!r})))
    """)
    assert_same_greedy(json.loads((tmp_path / "report.json").read_text()))

