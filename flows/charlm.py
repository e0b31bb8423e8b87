"""The character language-model flow: corpus -> vocabulary & split -> train -> samples ->
register. Run ``python -m flows.charlm --help`` for every option."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from flows import exit_process
from flows.cli import checkpoint_dir, checkpointed, config_flow, registration_note, run_from_command_line
from tasks import ingest, text
from tasks.config import CharLMFlowConfig, safe_name
from tasks.tracking import CHAMPION, check_tracking_server

DESCRIPTION = "Train a character-level language model (RNN/LSTM/GRU) on a text corpus and register it in MLflow."


@config_flow(CharLMFlowConfig, name="charlm-training", description=DESCRIPTION)
def charlm_flow(cfg: CharLMFlowConfig) -> dict:
    # here, not at the top: the command line checks its input without importing MLflow and torch
    from flows import steps

    check_tracking_server()  # before any work: a run that cannot be registered is not started

    # --- extract
    path, sha256 = steps.fetch_data(cfg.corpus, cfg.sha256)
    corpus = steps.load_corpus(path, sha256, cfg)

    # --- transform
    checkpoints = checkpoint_dir(cfg, corpus.sha256)
    with checkpointed(checkpoints, "charlm", cfg, corpus.sha256):
        trained = steps.train_charlm(corpus, cfg, partial(publish_samples, cfg.registered_name), checkpoints)

        # --- load
        reg = steps.register_charlm(cfg, corpus, trained, steps.champion_gate_lock)

    name, fit = cfg.registered_name, trained.fit
    bpc = fit.best_val_loss / math.log(2)
    samples = samples_markdown(trained.samples[0])
    report = (f"### {name} v{reg.version}\n\n"
              f"| validation loss (nats/char) | bits/char | perplexity | best epoch | tokens/s |\n"
              f"|---:|---:|---:|---:|---:|\n"
              f"| {fit.best_val_loss:.4f} | {bpc:.4f} | {math.exp(fit.best_val_loss):.3f} | {fit.best_epoch} "
              f"| {fit.samples_per_second:,.0f} |\n\n{samples}\n\n"
              f"{registration_note(name, reg)}")
    create_markdown_artifact(report, key=f"{safe_name(name)}-report", description=f"{name} v{reg.version}")
    return {"model_name": name, "version": reg.version, "model_uri": reg.model_uri,
            "champion_uri": f"models:/{name}@{CHAMPION}", "promoted": reg.promoted, "reason": reg.reason,
            "run_id": reg.run_id, "val_loss": fit.best_val_loss, "val_bpc": bpc, "samples": trained.samples[0],
            "report": report, "train_seconds": fit.train_seconds, "device": trained.device}


def samples_markdown(texts: dict[str, str]) -> str:
    return "\n\n".join(f"**{p!r}** →\n\n```\n{t}\n```" for p, t in texts.items())


def publish_samples(name: str, epoch: int, texts: dict[str, str]) -> None:
    """The samples as a Prefect artifact (one key, a new version each time), to watch in the UI."""
    create_markdown_artifact(f"### {name}, epoch {epoch}\n\n{samples_markdown(texts)}",
                             key=f"{safe_name(name)}-samples",
                             description=f"samples after epoch {epoch}" if epoch else "samples of the final model")


def check_input(cfg: CharLMFlowConfig) -> Path:
    """What can be checked without training, before Prefect starts: the tracking server answers,
    the corpus is a readable UTF-8 file, long enough for the split. Returns the run's checkpoint
    folder."""
    check_tracking_server()
    corpus = text.load_corpus(*ingest.fetch_data(cfg.corpus, cfg.sha256, hand_over=True), cfg)
    return checkpoint_dir(cfg, corpus.sha256)


def main(argv: list[str] | None = None) -> int:
    return run_from_command_line(CharLMFlowConfig, charlm_flow, argv, "python -m flows.charlm", DESCRIPTION,
                                 check=check_input)


if __name__ == "__main__":
    exit_process(main())
